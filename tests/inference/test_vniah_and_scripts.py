"""V-NIAH, the generate script and the inference benchmark on a random tiny model, on CPU ranks.

- tools/eval_vniah.py on a 2x2 mesh and on one rank writes VILA's files (all_accuracies.json with its keys,
  avg_accuracy.txt, heatmap.png), scores every cell both ways, and its teacher-forced predictions are identical on
  both meshes wherever the one-rank top-2 logit margin exceeds 1e-4; for single-token answers the generated first
  token equals the teacher-forced argmax; the second run reuses the first one's haystack cache, and says so.
- examples/generate_longvila.py answers a question about a real (H.264) video on 4 CPU ranks (2x2) with the same
  tokens as on one rank, and reports its figures with --json.
- tools/bench_inference.py: MM-SP and the layer-pipeline baseline generate the same tokens.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save_random_model(rank, world, out):
    """A random tiny LongVILA (head dims multiples of 8) saved in the project's format, with its record."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    import vniah_demo
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.models.record import record_of
    from megatron_longvila.models.registry import ENCODERS, LLMShape, build_longvila
    from megatron_longvila.runtime.cpu import enable_cpu_runtime
    from megatron_longvila.checkpoint.distributed import save_checkpoint

    enable_cpu_runtime()
    ps.initialize_model_parallel()
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    tok = load_tokenizer(None)
    shape = LLMShape(**dict(vniah_demo.SHAPE, vocab_size=384))
    vision = ENCODERS["siglip_tiny"]
    model = build_longvila(encoder=vision, llm=shape, media_token_id=tok.image_token_id,
                           real_vocab_size=tok.vocab_size)
    model.record = record_of(shape, vision, real_vocab_size=tok.vocab_size,
                             tokenizer={"vocab_size": tok.vocab_size, "media_token_id": tok.image_token_id,
                                        "frame_separator_id": tok.frame_sep_token_id, "pad_id": tok.pad_id,
                                        "eos_id": tok.eos_id, "template": "chatml"})
    save_checkpoint(out, 1, model, None, None, data_state=None, train_state={})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("random_ckpt") / "ckpt")
    run_distributed(_save_random_model, 1, out, timeout=120)
    return out


def _run(args, timeout=400):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def test_vniah_grid_files_and_mesh_invariance(ckpt, tmp_path):
    runs = {}
    for name, mesh in (("2x2", ["--cpu-ranks", "4", "--hierarchical-context-parallel-sizes", "2", "2"]),
                       ("1x1", ["--cpu-ranks", "1"])):
        out = str(tmp_path / name)
        said = _run(["tools/eval_vniah.py", "--load", ckpt, "--synthetic-haystack", "--frames", "3", "6", "--depths",
                     "0", "50", "100", "--out", out, "--cache", str(tmp_path / "cache"), "--json", *mesh])
        # The 2x2 run builds the haystack cache; the 1x1 run, the same checkpoint, preprocessing and frames, reuses it.
        assert ("[vniah] no haystack cache at" if name == "2x2" else "[vniah] reusing haystack cache") in said, said
        acc = json.load(open(os.path.join(out, "all_accuracies.json")))
        assert len(acc) == 6 and set(acc[0]) == {"Num. Frame", "Frame Depth", "Score"}
        assert all(0.0 <= a["Score"] <= 1.0 for a in acc)
        avg = float(open(os.path.join(out, "avg_accuracy.txt")).read())
        assert abs(avg - sum(a["Score"] for a in acc) / 6) < 1e-9
        assert os.path.getsize(os.path.join(out, "heatmap.png")) > 1000
        runs[name] = json.load(open(os.path.join(out, "details.json")))
    compared = 0
    for ref_row, row in zip(runs["1x1"], runs["2x2"]):
        assert (ref_row["Num. Frame"], ref_row["Frame Depth"]) == (row["Num. Frame"], row["Frame Depth"])
        for ref, got in zip(ref_row["needles"], row["needles"]):
            for r_id, g_id, margin in zip(ref["teacher_ids"], got["teacher_ids"], ref["margins"]):
                if margin > 1e-4:
                    compared += 1
                    assert r_id == g_id, (ref_row, ref, got)
            if len(got["teacher_ids"]) == 1:  # one-token answers: generation's first token is the argmax
                assert got["generated_ids"][0] == got["teacher_ids"][0]
    assert compared > 20


def test_generate_script_answers_about_a_real_video(ckpt, tmp_path):
    from tests.data.media import ffmpeg_exe, make_testsrc_video

    if ffmpeg_exe() is None:
        pytest.skip("needs an ffmpeg binary (imageio-ffmpeg) to write the test video")
    video = make_testsrc_video(str(tmp_path / "clip.mp4"), "h264", seconds=1)
    outs = {}
    for name, mesh in (("2x2", ["--cpu-ranks", "4", "--hierarchical-context-parallel-sizes", "2", "2"]),
                       ("1x1", ["--cpu-ranks", "1"])):
        out = _run(["examples/generate_longvila.py", "--load", ckpt, "--video", video, "--prompt",
                    "What happens in the video?", "--num-frames", "5", "--max-new-tokens", "12", "--json", *mesh])
        outs[name] = json.loads(out.strip().splitlines()[-1])
    a, b = outs["2x2"], outs["1x1"]
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) >= 1
    assert a["mesh"] == "2x2" and len(a["peak_memory_gb_per_rank"]) == 4 and a["prompt_tokens"] > 20
    assert isinstance(a["answer"], str) and a["prefill_s"] > 0


def test_bench_inference_pipeline_baseline_matches(tmp_path):
    out = _run(["tools/bench_inference.py", "--ranks", "2", "--ulysses", "1", "--ring", "2", "--prompt-tokens", "96",
                "--new-tokens", "4", "--hidden", "64", "--heads", "4", "--layers", "2", "--json"])
    res = json.loads(out.strip().splitlines()[-1])
    assert res["tokens_equal"], res
    assert res["mmsp"]["longest_prompt"] > res["pipeline"]["longest_prompt"]

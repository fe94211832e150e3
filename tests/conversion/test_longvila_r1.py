"""LongVILA-R1-7B's layout as NVIDIA published it (VILA's remote-code flavour), at toy size.

The folder: config.json with model_type "vila", architectures ["VILAForCausalLM"], version "2.0" and an auto_map to
VILA's Python files shipped beside the weights; the dev-style config kept as config_vila_style.json
(["LlavaLlamaModel"]); llm/ a Qwen2 causal LM (R1: hidden 3584, intermediate 18944; here the fixtures' toy sizes),
vision_tower/ a SigLIP without pooling head, mm_projector/ with mm_projector_type "mlp_downsample_2x2_fix" and
model_type "v2l_projector". The vision tower's image size is read from vision_tower/config.json as VILA's code
does (its SigLIP tower takes transformers' SiglipVisionConfig; R1's 448 px is inferred from its 257 tokens per
frame, 16 x 16 after the 2x2 downsample plus the "\\n", not read: the toy tower here is 56 px).

- Read: the remote flavour, row-major tokens (2x2_fix), hidden_states[-2], "\\n" after each frame (VILA's remote
  code always builds its basic encoders), the tokenizer's media id after the stored rows.
- Per-token losses on 1 rank equal the transformers-composed reference (tests/conversion/reference.py), max |error|
  <= 1e-5 x max |reference| over the learned tokens, as in test_losses.
- HF -> MCore -> HF gives back every file byte for byte (config_vila_style.json and the Python files included).
- Refused, naming the key: a config_vila_style.json that disagrees with config.json, NVILA's temporal-pooling
  video encoder.
"""

import json
import os
import shutil

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

from .fixtures import list_files, make_vila
from .reference import VilaReference, micro_batch, samples

pytest.importorskip("transformers")

RTOL = 1e-5
SEED = 4
AUTO_MAP = {"AutoProcessor": "auto_processor.VILAProcessor", "AutoConfig": "modeling_vila.VILAConfig",
            "AutoModel": "modeling_vila.VILAForCausalLM", "AutoModelForCausalLM": "modeling_vila.VILAForCausalLM"}
REMOTE_FILES = ("configuration_vila.py", "modeling_vila.py", "auto_processor.py", "base_projector.py",
                "siglip_encoder.py", "media_encoder.py")


def _write(path, d):
    with open(path, "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def make_r1(root: str) -> str:
    """A toy LongVILA-R1 folder: the fixtures' remote-code case made R1-shaped (no RoPE scaling, R1's top-level keys,
    config_vila_style.json, the remote-code files)."""
    out = make_vila(root, "qwen2_1m")  # remote flavour, untied Qwen2, SigLIP without head, mlp_downsample_2x2_fix
    llm_path = os.path.join(out, "llm", "config.json")
    llm = json.load(open(llm_path))
    llm.update(rope_theta=1000000.0, rope_scaling=None)
    _write(llm_path, llm)
    top = json.load(open(os.path.join(out, "config.json")))
    top.update(llm_cfg=llm, architectures=["VILAForCausalLM"], model_type="vila", version="2.0", auto_map=AUTO_MAP,
               num_video_frames=8, fps=0.0, image_aspect_ratio="resize")
    _write(os.path.join(out, "config.json"), top)
    dev = {k: v for k, v in top.items() if k not in ("auto_map", "version")}
    dev.update(architectures=["LlavaLlamaModel"], model_type="llava_llama")
    _write(os.path.join(out, "config_vila_style.json"), dev)
    for name in REMOTE_FILES:
        with open(os.path.join(out, name), "w") as f:
            f.write(f"# VILA's remote code ({name}) ships here; the converter copies it and never runs it\n")
    return out


def _ranks(rank, world, path):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.conversion import load_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel()
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    model = load_longvila(path)
    planned = plan_microbatch(model.visual_spec, micro_batch(model.record, SEED), single_rank_mesh()).to("cpu")
    with torch.no_grad():
        ce, w = model(planned, reduction="none")
    ps.destroy_model_parallel()
    return planned.plan.gather(ce[0]), planned.plan.gather(w[0])


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("longvila_r1"))
    return root, make_r1(root)


def test_r1_layout_is_read_as_vila_runs_it(r1):
    from megatron_longvila.conversion import read_record

    _, path = r1
    rec = read_record(path)
    assert rec.source["flavour"] == "remote" and rec.hf["mm_projector_type"] == "mlp_downsample_2x2_fix"
    assert rec.token_order == "row_major" and rec.vision_select_layer == -2 and rec.rope_scaling is None
    assert rec.media["frame_separator"] == "\n" and rec.vision["head"] is False
    assert rec.tokenizer["media_token_id"] == rec.llm["vocab_size"] + 1  # <image> after <vila/sentinel>
    assert rec.vision["image_size"] == json.load(open(os.path.join(path, "vision_tower", "config.json")))["image_size"]


def test_r1_losses_equal_the_transformers_reference(r1):
    from megatron_longvila.conversion import read_record

    _, path = r1
    rec = read_record(path)
    ref = VilaReference(path, rec.token_order)
    for part, info in ref.load_info.items():
        assert not info["missing_keys"] and not info["unexpected_keys"], (part, info)
    want = ref.token_losses(samples(rec, SEED))
    got, w = run_distributed(_ranks, 1, path, timeout=240)[0]
    mask = w > 0
    assert int(mask.sum()) > 20 and got.shape == want.shape
    err = float((got - want)[mask].abs().max()) / float(want[mask].abs().max())
    assert err <= RTOL, err


def test_r1_round_trip_is_byte_identical(r1):
    from megatron_longvila.conversion import convert

    root, path = r1
    m = convert(source=path, target=f"{root}/r1.mcore", target_format="mcore", progress=False)["target"]
    back = convert(source=m, target=f"{root}/r1.hf", target_format="hf", progress=False)["target"]
    assert list_files(back) == list_files(path)
    assert {"config_vila_style.json", *REMOTE_FILES} <= set(list_files(back))
    for f in list_files(path):
        assert open(os.path.join(path, f), "rb").read() == open(os.path.join(back, f), "rb").read(), f


def test_r1_unsupported_keys_are_refused_by_name(r1, tmp_path):
    from megatron_longvila.conversion import read_record
    from megatron_longvila.errors import ConversionError

    _, path = r1
    d = str(tmp_path / "disagree")
    shutil.copytree(path, d)
    dev = json.load(open(os.path.join(d, "config_vila_style.json")))
    dev["mm_vision_select_layer"] = -1
    _write(os.path.join(d, "config_vila_style.json"), dev)
    with pytest.raises(ConversionError, match=r"config_vila_style.json: mm_vision_select_layer -1, config.json says "
                                              r"-2"):
        read_record(d)
    d = str(tmp_path / "tsp")
    shutil.copytree(path, d)
    top = json.load(open(os.path.join(d, "config.json")))
    top["video_encoder"] = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]})
    _write(os.path.join(d, "config.json"), top)
    with pytest.raises(ConversionError, match=r"config.json: video_encoder _target_ 'llava.model.encoders."
                                              r"TSPVideoEncoder' \(temporal pooling"):
        read_record(d)

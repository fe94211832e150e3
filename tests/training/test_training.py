"""Training on CPU ranks with the example's providers: exact resume, resharded load, killed saves, the demo.

- Exact resume: N steps straight and k steps + save + resume for N-k give bitwise equal losses (fp32).
- Resharding: a checkpoint saved at TP=2, CP 2x1 loads at TP=1, CP 2x2 and the next step's loss matches
  the saving layout's own next step (within fp32 reordering).
- Killed save: a rank killed after writing its shards, before the commit, leaves the previous checkpoint
  named by the tracker and loadable; the resumed run completes and replaces the stale partial directory.
- The README demo command trains and its loss falls.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.checkpoint.layout import read_tracker, TRACKER

from .example_script import SCRIPT, load_example_script, write_text_manifest


pytest.importorskip("av")


def _script():
    return load_example_script()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _script().write_demo_dataset(str(tmp_path_factory.mktemp("demo_data")), num_videos=12)


def _argv(manifest, *, tp, u, r, iters, extra=()):
    return ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
            "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(u * r),
            "--hierarchical-context-parallel-sizes", str(u), str(r), "--seq-length", "384",
            "--global-batch-size", "2", "--train-iters", str(iters), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "1", "--num-frames", "6", "--data-path", manifest, "--log-interval", "100",
            "--seed", "7", *extra]


def test_exact_resume_and_resharded_load(manifest, tmp_path):
    import math

    tmp = str(tmp_path)
    out = run_distributed(_resume_and_reshard_v2, 4, manifest, tmp, timeout=280)[-1]
    straight, resumed = out["straight"], out["resumed"]
    assert out["resumed_from"] == 2
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in straight.values())
    # Bitwise: every loss equal as a float, not merely close.
    assert straight == resumed, (straight, resumed)
    # The saved TP=2 run continued to iteration 3 by itself; the TP=1, CP 2x2 run loaded its iteration-2
    # checkpoint and must take the same step.
    assert out["reshard_error"] and "--no-load-rng" in out["reshard_error"]
    assert out["reshard_start"] == 2
    ref, got = out["tp2"][3], out["resharded"][3]
    assert abs(got - ref) <= 1e-5 * abs(ref), (got, ref)


def _resume_and_reshard_v2(rank, world, manifest, tmp):
    mod = _script()

    def run(argv, hooks=None):
        return mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                            extra_args_provider=mod.extra_args_provider, argv=argv, hooks=hooks)

    out = {}
    out["straight"] = run(_argv(manifest, tp=1, u=2, r=2, iters=5)).losses
    a = os.path.join(tmp, "resume")
    first = run(_argv(manifest, tp=1, u=2, r=2, iters=5, extra=["--save", a, "--save-interval", "2"]),
                hooks={"stop_after": 2})
    second = run(_argv(manifest, tp=1, u=2, r=2, iters=5, extra=["--save", a, "--load", a]))
    out["resumed"] = {**first.losses, **second.losses}
    out["resumed_from"] = second.start_iteration

    b = os.path.join(tmp, "reshard")
    out["tp2"] = run(_argv(manifest, tp=2, u=2, r=1, iters=3, extra=["--save", b, "--save-interval", "2"])).losses
    out["reshard_error"] = None
    try:
        run(_argv(manifest, tp=1, u=2, r=2, iters=3, extra=["--load", b]))
    except Exception as e:  # noqa: BLE001  (the message is what is checked)
        out["reshard_error"] = str(e)
    # The tracker now names iteration 3 (the TP=2 run's final save); load its iteration-2 checkpoint.
    if rank == 0:
        with open(os.path.join(b, TRACKER), "w") as f:
            f.write("2")
    import torch.distributed as dist

    dist.barrier()
    res = run(_argv(manifest, tp=1, u=2, r=2, iters=3, extra=["--load", b, "--no-load-rng"]))
    out["resharded"], out["reshard_start"] = res.losses, res.start_iteration
    return out


def _killed_save(rank, world, manifest, ckpt):
    mod = _script()
    calls = {"n": 0}

    def after_write():
        calls["n"] += 1
        if calls["n"] == 2 and rank == 1:  # the second save (iteration 4): die with shards half committed
            os.kill(os.getpid(), signal.SIGKILL)

    mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                 extra_args_provider=mod.extra_args_provider,
                 argv=_argv(manifest, tp=1, u=2, r=1, iters=4, extra=["--save", ckpt, "--save-interval", "2"]),
                 hooks={"after_write": after_write})


def _resume_after_kill(rank, world, manifest, ckpt):
    mod = _script()
    res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                       extra_args_provider=mod.extra_args_provider,
                       argv=_argv(manifest, tp=1, u=2, r=1, iters=4, extra=[
                           "--save", ckpt, "--load", ckpt, "--valid-data-path", manifest, "--eval-interval", "4",
                           "--eval-iters", "1"]))
    return {"start": res.start_iteration, "losses": res.losses, "valid": res.valid_losses}


def test_killed_save_keeps_previous_checkpoint(manifest, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(DistributedRunError):  # the killed rank, or its peer losing it, fails the world
        run_distributed(_killed_save, 2, manifest, ckpt, timeout=150)
    assert read_tracker(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, ".iter_0000004.partial"))
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004"))
    out = run_distributed(_resume_after_kill, 2, manifest, ckpt, timeout=150)[-1]
    assert out["start"] == 2 and sorted(out["losses"]) == [3, 4]
    assert list(out["valid"]) == [4] and 0 < out["valid"][4] < 10  # forward-only evaluation ran
    assert read_tracker(ckpt) == 4
    assert not os.path.exists(os.path.join(ckpt, ".iter_0000004.partial"))


DEMO_TEST_FLAGS = ["--demo-colors", "red", "blue", "--demo-motions", "left", "right", "--demo-clips", "384",
                   "--demo-heldout", "4", "--train-iters", "150", "--save-interval", "150", "--log-interval", "50"]
"""The demo at test size: 2 colours x 2 directions (96 clips each), 150 steps on the 2x2 mesh (about a minute)."""


def test_demo_learns_its_videos(tmp_path):
    """End to end: the demo trains a tiny LongVILA on its 2x2 MM-SP mesh on clips whose caption depends only on the
    video (the square's colour and its direction of motion, from the first and the last frame), then asks it about
    16 clips it never trained on. The one test that fails if decode, encode, route, attend or the loss quietly loses
    the picture: a model that ignores the video answers half the colours and half the directions right."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, SCRIPT, "--demo", "--demo-dir", str(tmp_path), "--metrics-file",
           str(tmp_path / "metrics.jsonl")] + DEMO_TEST_FLAGS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LongVILA demo trained" in proc.stdout and "MM-SP 2x2 mesh" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == list(range(1, 151))
    assert all(r["tokens_per_s"] > 0 for r in rows)
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    ckpt = tmp_path / "checkpoints"
    assert read_tracker(str(ckpt)) == 150

    summary = json.load(open(ckpt / "demo_summary.json"))
    ev = summary["heldout"]
    assert summary["mesh"] == {"ulysses": 2, "ring": 2, "ranks": 4}
    assert ev["clips"] == 16 and ev["frames_per_video"] == 2
    assert ev["color"] >= 0.9 and ev["direction"] >= 0.9, ev
    assert len(ev["examples"]) == 3 and all(e["answer"] for e in ev["examples"])
    assert proc.stdout.count("    Q: What happens in the video?") == 3 and "Held-out accuracy over 16 clips" in proc.stdout
    # The checkpoint records the frames per video it was trained with; generation takes them from there.
    record = json.load(open(ckpt / "iter_0000150" / "model_record.json"))
    assert record["media"]["num_video_frames"] == 2 and record["media"]["frame_sampling"] == "uniform"
    clip = json.loads(open(tmp_path / "data" / "heldout.jsonl").readline())
    generate = os.path.join(os.path.dirname(SCRIPT), "generate_longvila.py")
    gen = subprocess.run([sys.executable, generate, "--cpu-ranks", "4", "--load", str(ckpt), "--video",
                          str(tmp_path / "data" / clip["video"]), "--prompt", "What happens in the video?", "--json"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert gen.returncode == 0, gen.stdout[-2000:] + gen.stderr[-2000:]
    out = json.loads(gen.stdout.strip().splitlines()[-1])
    assert out["num_frames"] == 2 and out["answer"].strip() == clip["conversations"][1]["value"], out

    # Run again: the final checkpoint is there, so one line says what to do, without training or generating data.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0 and "already holds the demo's final checkpoint (iteration 150)" in again.stdout
    assert "--train-iters 300" in again.stdout and len(again.stdout.strip().splitlines()) == 1


def _overlap(rank, world, manifest, tmp):
    mod = _script()
    out = {}
    for name, extra in (("plain", []), ("overlap", ["--overlap-grad-reduce"])):
        metrics = os.path.join(tmp, f"{name}.jsonl")
        argv = ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny", "--seq-length",
                "128", "--global-batch-size", "2", "--train-iters", "3", "--lr", "2e-3", "--min-lr", "2e-4",
                "--lr-warmup-iters", "1", "--data-path", manifest, "--log-interval", "100", "--seed", "7",
                "--metrics-file", metrics, *extra]
        res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                           extra_args_provider=mod.extra_args_provider, argv=argv)
        out[name] = res.losses
        if rank == world - 1:
            out[name + "_grad_norms"] = [json.loads(line)["grad_norm"] for line in open(metrics)]
    return out


def test_overlap_grad_reduce_with_a_trainable_encoder_and_no_frames(tmp_path):
    """--overlap-grad-reduce at DP 2 with the encoder training (short_sft) and micro-batches without media, so no
    rank encodes a frame: megatron-core's overlapped buckets for the encoder used to wait forever (an assertion in
    zero_grad_buffer); now every rank's backward reports those parameters (zero gradients) and the run equals the
    one without overlap, losses and gradient norms bitwise."""
    manifest = write_text_manifest(str(tmp_path / "text.jsonl"))
    out = run_distributed(_overlap, 2, manifest, str(tmp_path), timeout=240)[-1]
    assert sorted(out["plain"]) == [1, 2, 3]
    assert out["overlap"] == out["plain"], out
    assert out["overlap_grad_norms"] == out["plain_grad_norms"] and len(out["plain_grad_norms"]) == 3


def _pipeline(rank, world, manifest, tmp):
    mod = _script()

    def run(argv, hooks=None):
        return mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                            extra_args_provider=mod.extra_args_provider, argv=argv, hooks=hooks)

    out = {}
    for name, tp, u, r, extra in (("pp2", 1, 2, 1, ["--pipeline-model-parallel-size", "2"]),):
        d = os.path.join(tmp, name)
        straight = run(_argv(manifest, tp=tp, u=u, r=r, iters=3, extra=extra)).losses
        first = run(_argv(manifest, tp=tp, u=u, r=r, iters=3, extra=extra + ["--save", d, "--save-interval", "2"]),
                    hooks={"stop_after": 2}).losses
        second = run(_argv(manifest, tp=tp, u=u, r=r, iters=3, extra=extra + ["--save", d, "--load", d])).losses
        out[name] = (straight, {**first, **second})
    return out


def test_exact_resume_pipeline(manifest, tmp_path):
    """PP=2 x CP 2x1 through the script: Megatron's 1F1B schedule, exact resume."""
    import math

    out = run_distributed(_pipeline, 4, manifest, str(tmp_path), timeout=280)[-1]
    for name, (straight, resumed) in out.items():
        assert sorted(straight) == [1, 2, 3] and all(math.isfinite(v) for v in straight.values()), name
        assert straight == resumed, (name, straight, resumed)


def _flops_run(rank, world, manifest, tmp):
    from megatron_longvila.training import step as step_mod

    seen, model = [], []
    original = step_mod.LongVILAStep._sequence_flops

    def record(self, mb):
        value = original(self, mb)
        seen.append((list(mb.seq_lens), [(f.height, f.width) for f in mb.frames], value))
        model[:] = [self._flops_model]  # (the shape read off the model, what trains)
        return value

    step_mod.LongVILAStep._sequence_flops = record
    metrics = os.path.join(tmp, "flops.jsonl")
    mod = _script()
    mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                 extra_args_provider=mod.extra_args_provider,
                 argv=_argv(manifest, tp=1, u=2, r=1, iters=2, extra=["--metrics-file", metrics]))
    logged = [json.loads(line) for line in open(metrics)] if rank == world - 1 else None
    return {"seen": seen, "logged": logged, "model": model}


def test_tflops_count_the_step_s_own_sequences_once_per_replica(manifest, tmp_path):
    """DP 2 x CP 2: each step's logged FLOPs are the model FLOPs of the sequences the two replicas trained (their
    own documents and frames, planning.flops; the CP ranks of a replica see the same ones, counted once), and
    TFLOP/s per device divide them by the step time and the 4 ranks."""
    from megatron_longvila.planning.flops import Trains, sequence_flops
    from megatron_longvila.planning.memory import ModelShape

    out = run_distributed(_flops_run, 4, manifest, str(tmp_path), timeout=240)
    seen = [o["seen"] for o in out]
    assert len(seen[0]) == 2 and seen[0] == seen[1] and seen[2] == seen[3]  # one sequence per replica per step
    assert any(frames for _, frames, _ in seen[0] + seen[2])  # the data has video
    # The tiny LLM and SigLIP-tiny (VILA's semantics: the last layer's raw hidden state, no post-LayerNorm run); the demo
    # tokenizer's vocabulary padded to a multiple of 128; short_sft trains all.
    shape = ModelShape(hidden=48, layers=2, heads=4, kv_heads=2, ffn=64, vocab=384, v_hidden=32, v_layers=2,
                       v_layers_run=2, v_heads=4, v_ffn=64, patch=14, image=56, v_post_norm=False)
    assert out[0]["model"] == [(shape, Trains())]
    for k, rec in enumerate(out[-1]["logged"]):
        want = sum(sequence_flops(shape, docs, frames, Trains())["total"] for docs, frames, _ in
                   (seen[0][k], seen[2][k]))
        assert rec["flops"] == pytest.approx(want, rel=1e-12)
        assert rec["tflops_per_device"] == pytest.approx(want / rec["step_time_s"] / 4 / 1e12, rel=1e-9)

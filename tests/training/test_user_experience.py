"""What a new user runs into: --help, a mistyped --load, resume-or-start, one voice under torchrun, bad data.

- `--help` of the training script (also with --demo) needs no launcher and writes nothing.
- `--load` that does not exist, or holds no checkpoint, is an error naming the path; `--load` equal to `--save`
  starts at iteration 0 with one note when there is nothing yet, and resumes the second time.
- A misconfiguration under a 4-rank torchrun launch: the project's message appears exactly once, no rank prints a
  traceback of the project's code, every rank exits non-zero.
- Training on a manifest that is half bad stops early, over the data-parallel ranks, with the reason and what to
  change.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.errors import ArgumentError
from megatron_longvila.training.arguments import parse_args

from .example_script import SCRIPT
from .test_training import _argv, _script, manifest  # noqa: F401  (the fixture)

pytest.importorskip("av")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_needs_no_launcher_and_writes_nothing(tmp_path):
    for extra in ([], ["--demo", "--demo-dir", str(tmp_path / "demo")]):
        r = subprocess.run([sys.executable, SCRIPT, "--help", *extra], capture_output=True, text=True, timeout=120,
                           cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 0 and r.stdout.count("usage:") == 1, r.stderr[-2000:]
        assert "Warning" not in r.stderr, r.stderr[-2000:]  # dependency noise filtered (runtime/quiet.py)
    assert not os.path.exists(tmp_path / "demo")


def test_mistyped_load_is_an_error_naming_the_path(tmp_path):
    base = ["--train-iters", "2", "--data-path", "x.jsonl", "--global-batch-size", "1"]
    with pytest.raises(ArgumentError, match=r"--load .*chekpoints does not exist"):
        parse_args(base + ["--load", str(tmp_path / "chekpoints"), "--save", str(tmp_path / "checkpoints")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgumentError, match="holds no checkpoint"):
        parse_args(base + ["--load", str(tmp_path / "empty")])
    # Starting fresh on purpose: --load equal to --save, or with --pretrained-checkpoint.
    parse_args(base + ["--load", str(tmp_path / "new"), "--save", str(tmp_path / "new")])


def _resume_or_start(rank, world, manifest, ckpt):
    import contextlib
    import io

    mod = _script()
    argv = _argv(manifest, tp=1, u=1, r=1, iters=2, extra=["--save", ckpt, "--load", ckpt, "--save-interval", "1"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        first = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                             extra_args_provider=mod.extra_args_provider, argv=argv)
    argv = _argv(manifest, tp=1, u=1, r=1, iters=3, extra=["--save", ckpt, "--load", ckpt])
    second = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                          extra_args_provider=mod.extra_args_provider, argv=argv)
    return {"log": out.getvalue(), "first": first.start_iteration, "second": second.start_iteration}


def test_load_equal_to_save_starts_then_resumes(manifest, tmp_path):
    out = run_distributed(_resume_or_start, 1, manifest, str(tmp_path / "ckpt"), timeout=200)[0]
    assert out["log"].count(f"no checkpoint in {tmp_path / 'ckpt'} yet: starting from iteration 0") == 1
    assert out["first"] == 0 and out["second"] == 2


def test_misconfiguration_under_torchrun_speaks_once(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "4", SCRIPT, "--cpu", "--recipe", "short_sft",
                        "--train-iters", "2", "--data-path", "missing.jsonl", "--global-batch-size", "2",
                        "--context-parallel-size", "4", "--hierarchical-context-parallel-sizes", "3", "2"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    text = r.stdout + r.stderr
    assert r.returncode != 0
    msg = "--hierarchical-context-parallel-sizes 3 2: give two sizes U R with U*R = --context-parallel-size 4"
    assert text.count(msg) == 1, text[-4000:]
    # torchrun prints its own ChildFailedError traceback; no rank prints one from the project's code.
    assert "megatron_longvila/" not in text and "pretrain_longvila.py\", line" not in text, text[-4000:]


def _half_bad(rank, world, manifest, bad_manifest):
    mod = _script()
    argv = _argv(bad_manifest, tp=1, u=1, r=1, iters=50)
    argv = [a if a != "2" or argv[i - 1] != "--global-batch-size" else "4" for i, a in enumerate(argv)]
    mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                 extra_args_provider=mod.extra_args_provider, argv=argv + ["--max-skip-fraction", "0.2"])


def test_half_bad_data_stops_early_over_dp(manifest, tmp_path):
    good = [json.loads(x) for x in open(manifest).read().splitlines()]
    root = os.path.dirname(manifest)
    lines = []
    for i, rec in enumerate(good * 2):
        rec = dict(rec, video=os.path.join(root, rec["video"]))
        if i % 2:
            rec["video"] = os.path.join(root, "videos", f"missing_{i}.mp4")
        lines.append(json.dumps(rec))
    bad = tmp_path / "half_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DistributedRunError) as e:
        run_distributed(_half_bad, 2, manifest, str(bad), timeout=200)  # DP 2: the fraction counts both ranks
    text = str(e.value)
    assert "SkipThresholdExceeded" in text and "'missing_file'" in text and "--max-skip-fraction 0.2" in text, text
    assert "check the manifest's paths" in text

"""The example's providers under Megatron-LM's own `megatron.training.pretrain` (issue 6).

Needs a Megatron-LM checkout at the commit named in patches/README.md: set MEGATRON_LM_PATH to it (CI has none,
so these tests skip there). On 4 CPU gloo ranks (a 2x2 MM-SP mesh) the tiny LongVILA trains a few iterations
through megatron.training, and its losses equal the project loop's for the same flags, seed and data.
"""

import math
import os
import shutil
import sys

import pytest

from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.checkpoint.data_state import DATA_STATE_DIR
from megatron_longvila.training import megatron_lm

from .example_script import load_example_script

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")

pytestmark = pytest.mark.skipif(
    not MEGATRON_LM or not os.path.isdir(os.path.join(MEGATRON_LM, "megatron", "training")),
    reason="needs a Megatron-LM checkout: set MEGATRON_LM_PATH (commit and setup in docs/TRAINING.md)")

pytest.importorskip("av")

ITERS = 4
# Both trainers reduce the same float64 [loss sum, tokens] reports; only the summation order of the final
# all-reduce may differ. Measured: equal to the last bit; the bound leaves room for that order.
RTOL = 1e-9


def _script():
    return load_example_script()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _script().write_demo_dataset(str(tmp_path_factory.mktemp("demo_data")), num_videos=12)


def _argv(manifest):
    return ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
            "--tensor-model-parallel-size", "1", "--context-parallel-size", "4",
            "--hierarchical-context-parallel-sizes", "2", "2", "--seq-length", "384", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "1", "--num-frames", "6", "--data-path", manifest, "--log-interval", "1",
            "--seed", "7"]


def _megatron_rank(rank, world, manifest, extra=()):
    sys.path.insert(0, MEGATRON_LM)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    mod = _script()
    from megatron_longvila.training import megatron_lm

    megatron_lm.enable_megatron_training_on_cpu()
    import megatron.training.training as mt

    losses = {}
    log = mt.training_log

    def record(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        if "lm loss" in loss_dict:  # the last pipeline stage's global token mean for this iteration
            losses[iteration] = float(loss_dict["lm loss"])
        return log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)

    mt.training_log = record  # Megatron prints the loss; the test wants the numbers
    try:
        mod.main(_argv(manifest) + ["--use-megatron-training"] + list(extra))
    except SystemExit as e:  # --exit-interval ends the run through sys.exit
        if e.code not in (0, None):
            raise
    return losses


def _loop_rank(rank, world, manifest):
    return _script().main(_argv(manifest)).losses


def test_megatron_training_matches_project_loop(manifest):
    ours = run_distributed(_loop_rank, 4, manifest, timeout=280)[-1]
    theirs = run_distributed(_megatron_rank, 4, manifest, timeout=280)[-1]
    print(f"\nproject loop: {ours}\nmegatron.training: {theirs}")
    assert sorted(theirs) == sorted(ours) == list(range(1, ITERS + 1))
    assert all(math.isfinite(v) for v in theirs.values())
    for it in ours:
        assert abs(theirs[it] - ours[it]) <= RTOL * abs(ours[it]), (it, theirs[it], ours[it])


def _resume_run(manifest, ckpt, drop_data_state=False):
    """2 iterations + save, then --load and the remaining ITERS - 2 (same flags, so the same schedule)."""
    first = run_distributed(_megatron_rank, 4, manifest, ["--save", ckpt, "--save-interval", "2", "--exit-interval", "2"], timeout=280)[-1]
    if drop_data_state:
        shutil.rmtree(os.path.join(ckpt, "iter_0000002", DATA_STATE_DIR))
    second = run_distributed(_megatron_rank, 4, manifest, ["--load", ckpt, "--save", ckpt, "--save-interval", "100"], timeout=280)[-1]
    return first, second


@pytest.fixture(scope="module")
def straight(manifest):
    return run_distributed(_megatron_rank, 4, manifest, timeout=280)[-1]


@pytest.mark.parametrize("drop_data_state", [False, True], ids=["saved_data_state", "replayed_from_consumed_samples"])
def test_megatron_training_resume_is_exact(manifest, straight, tmp_path, drop_data_state):
    ckpt = str(tmp_path / "ckpt")
    first, second = _resume_run(manifest, ckpt, drop_data_state)
    print(f"\nstraight: {straight}\nfirst: {first}\nresumed: {second}")
    assert sorted(first) == [1, 2] and sorted(second) == list(range(3, ITERS + 1))
    assert os.path.isdir(os.path.join(ckpt, "iter_0000002"))
    for it, loss in {**first, **second}.items():
        assert abs(loss - straight[it]) <= RTOL * abs(straight[it]), (it, loss, straight[it])

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

from .example_script import load_example_script, write_text_manifest

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")

pytestmark = pytest.mark.skipif(
    not MEGATRON_LM or not os.path.isdir(os.path.join(MEGATRON_LM, "megatron", "training")),
    reason="needs a Megatron-LM checkout: set MEGATRON_LM_PATH (commit and setup in docs/TRAINING.md)")

pytest.importorskip("av")

ITERS = 4
# Both trainers reduce the same float64 [loss sum, tokens] reports; only the summation order of the final
# all-reduce may differ. Measured: equal to the last bit; the bound leaves room for that order.
RTOL = 1e-9


def record_megatron_losses() -> dict:
    """{iteration: "lm loss"} of megatron.training's log, filled as it trains (Megatron prints the loss; the tests want
    the numbers): the last pipeline stage's global token mean per iteration."""
    import megatron.training.training as mt

    losses, log = {}, mt.training_log

    def record(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        if "lm loss" in loss_dict:
            losses[iteration] = float(loss_dict["lm loss"])
        return log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)

    mt.training_log = record
    return losses


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
    losses = record_megatron_losses()
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


def _resolve_command_line(rank, world, argv):
    """Megatron-LM's own parser with LongVILA's provider, then LongVILA's resolution: (llm fields, their sources), or
    the error a launch would stop with."""
    sys.path.insert(0, MEGATRON_LM)
    from megatron_longvila.errors import ArgumentError
    from megatron_longvila.models.registry import LLMS
    from megatron_longvila.training.model_flags import resolve_model

    megatron_lm._no_triton_stand_in()
    from megatron.training.arguments import parse_args

    sys.argv = ["pretrain_longvila.py"] + list(argv)
    args = parse_args(megatron_lm.args_provider_for(_script().extra_args_provider))
    try:
        megatron_lm._finalize(args)
        r = resolve_model(args, LLMS["tiny"], given=args.model_flags_given, cuda=False, te=False,
                          shape_source="--llm tiny")
    except ArgumentError as e:
        return str(e)
    return r.llm, r.sources["llm"]


def test_megatron_command_line_flags_are_resolved_or_refused(manifest):
    """Under --use-megatron-training the flags the user gave reach the configs with Megatron's meaning; Megatron's
    parser defaults (dropouts of 0.1, fusions on) do not; --num-workers drives the data producer; an unmapped flag, a shape contradiction and FP8 without
    Transformer Engine are refused with their reasons."""
    base = _argv(manifest) + ["--use-megatron-training"]
    cases = [
        ["--init-method-std", "0.01", "--hidden-dropout", "0.05", "--no-persist-layer-norm", "--disable-bias-linear",
         "--num-layers", "2", "--norm-epsilon", "1e-6", "--num-workers", "2", "--decode-backend", "pyav"],
        ["--deterministic-mode"],
        ["--hidden-size", "99"],
        ["--fp8-format", "hybrid", "--bf16"],
    ]
    out = [run_distributed(_resolve_command_line, 1, base + extra, timeout=120)[0] for extra in cases]
    llm, sources = out[0]
    assert llm["init_method_std"] == 0.01 and sources["init_method_std"] == "flag --init-method-std"
    assert llm["hidden_dropout"] == 0.05 and llm["attention_dropout"] == 0.0, llm
    assert sources["attention_dropout"].startswith("recipe")
    assert llm["persist_layer_norm"] is False and sources["persist_layer_norm"] == "flag --no-persist-layer-norm"
    assert llm["masked_softmax_fusion"] is False and llm["apply_rope_fusion"] is False  # a CPU run, not given
    assert "--deterministic-mode: not mapped" in out[1], out[1]  # --num-workers is the data producer's (accepted above)
    assert "--hidden-size 99 contradicts" in out[2] and "48" in out[2], out[2]
    assert "Transformer Engine" in out[3], out[3]


def _megatron_overlap(rank, world, manifest, extra):
    sys.path.insert(0, MEGATRON_LM)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    mod = _script()
    megatron_lm.enable_megatron_training_on_cpu()
    losses = record_megatron_losses()
    mod.main(["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny", "--seq-length",
              "128", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "3", "--lr", "2e-3",
              "--min-lr", "2e-4", "--lr-warmup-iters", "1", "--data-path", manifest, "--log-interval", "1",
              "--seed", "7", "--use-megatron-training", *extra])
    return losses


def test_megatron_training_overlap_with_a_trainable_encoder_and_no_frames(tmp_path):
    """megatron.training at DP 2 with the encoder training and micro-batches without media: with
    --overlap-grad-reduce the run completes (megatron-core's buckets for the encoder are reported by every backward)
    and its losses equal the run without overlap, bitwise."""
    manifest = write_text_manifest(str(tmp_path / "text.jsonl"))
    plain = run_distributed(_megatron_overlap, 2, manifest, [], timeout=280)[-1]
    overlap = run_distributed(_megatron_overlap, 2, manifest, ["--overlap-grad-reduce"], timeout=280)[-1]
    assert sorted(plain) == [1, 2, 3], plain
    assert overlap == plain, (overlap, plain)

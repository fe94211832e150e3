"""Arguments and recipes: Megatron's flag names, recipe defaults, and start-up errors that name the flag."""

import pytest

from megatron_longvila.models.freezing import STAGES
from megatron_longvila.errors import ArgumentError
from megatron_longvila.training.arguments import parse_args
from megatron_longvila.training.recipes import RECIPES, get_recipe, rope_base_for_length

BASE = ["--train-iters", "10", "--data-path", "x.jsonl"]


def test_five_stages_in_order_each_from_the_previous():
    names = list(RECIPES)
    assert names == ["align", "pretrain", "short_sft", "context_extension", "long_sft"]
    assert [RECIPES[n].stage for n in names] == [1, 2, 3, 4, 5]
    for prev, cur in zip(names, names[1:]):
        assert RECIPES[cur].previous == prev
    assert RECIPES["align"].previous is None
    for r in RECIPES.values():
        assert r.freeze in STAGES and r.lr > r.min_lr >= 0 and r.seq_length > 0
    assert not STAGES["align"].train_llm and STAGES["align"].train_projector and not STAGES["align"].train_vision
    assert not STAGES["context_extension"].train_vision and STAGES["context_extension"].train_llm
    assert all(vars(STAGES["long_sft"]).values())


def test_rope_bases_per_target_length():
    assert rope_base_for_length(131_072) == 15_300_000
    assert rope_base_for_length(262_144) == 207_112_184
    assert rope_base_for_length(524_288) == 1_062_356_830
    assert rope_base_for_length(1_048_576) == 3_580_165_449
    with pytest.raises(ValueError, match="--seq-length"):
        rope_base_for_length(100_000)
    a = parse_args(BASE + ["--recipe", "context_extension", "--seq-length", "524288"], world_size=8)
    assert a.recipe_rotary_base == 1_062_356_830 and a.recipe_changes_rope and a.freeze == "context_extension"
    assert a.rotary_base is None  # not given: the model record decides (training.providers)
    with pytest.raises(ArgumentError, match="--rotary-base"):
        parse_args(BASE + ["--recipe", "context_extension", "--seq-length", "65536"], world_size=8)
    a = parse_args(BASE + ["--recipe", "long_sft"], world_size=8)
    assert a.recipe_rotary_base == 207_112_184 and not a.recipe_changes_rope


def test_recipe_fills_unset_flags_and_explicit_flags_win():
    a = parse_args(BASE + ["--recipe", "align"], world_size=1)
    r = get_recipe("align")
    assert (a.lr, a.seq_length, a.global_batch_size, a.template) == (r.lr, r.seq_length, r.global_batch_size,
                                                                      r.template)
    a = parse_args(BASE + ["--recipe", "align", "--lr", "0.5", "--seq-length", "128", "--global-batch-size", "4"],
                   world_size=1)
    assert (a.lr, a.seq_length, a.global_batch_size) == (0.5, 128, 4)


@pytest.mark.parametrize("argv, flag", [
    (["--context-parallel-size", "4"], "--hierarchical-context-parallel-sizes"),
    (["--context-parallel-size", "4", "--hierarchical-context-parallel-sizes", "2", "1"],
     "--hierarchical-context-parallel-sizes"),
    (["--micro-batch-size", "2"], "--micro-batch-size"),
    (["--global-batch-size", "3", "--tensor-model-parallel-size", "2"], "--global-batch-size"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (["--save-interval", "5"], "--save"),
    (["--lr-warmup-iters", "10"], "--lr-warmup-iters"),
    (["--eval-interval", "5"], "--valid-data-path"),
])
def test_misconfiguration_names_the_flag(argv, flag):
    with pytest.raises(ArgumentError, match=flag):
        parse_args(BASE + argv, world_size=4)


def test_required_flags():
    with pytest.raises(ArgumentError, match="--train-iters"):
        parse_args(["--data-path", "x.jsonl"], world_size=1)
    with pytest.raises(ArgumentError, match="--data-path"):
        parse_args(["--train-iters", "3"], world_size=1)


def test_tensorboard_flag_needs_tensorboard(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:
        with pytest.raises(ArgumentError, match="--tensorboard-dir"):
            parse_args(BASE + ["--tensorboard-dir", str(tmp_path)], world_size=1)
    else:
        assert parse_args(BASE + ["--tensorboard-dir", str(tmp_path)], world_size=1).tensorboard_dir

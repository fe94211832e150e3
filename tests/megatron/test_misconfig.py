"""Every invalid MM-SP configuration is rejected at start-up (before any model or forward pass), with a message
naming the Megatron flag (or argument) to change."""

import pytest

from megatron_longvila.errors import MMSPConfigError
from megatron_longvila.config import mmsp_config_from_megatron, validate_mmsp
from tests.megatron import harness as H


def _cfg(**kw):
    return H.make_config(**kw)


def _mutated(cfg, **attrs):
    # Megatron's own __post_init__ rejects some of these first; set them afterwards to reach our checks.
    for k, v in attrs.items():
        setattr(cfg, k, v)
    return cfg


CASES = [
    ("cp_without_hierarchical_sizes", lambda: (_cfg(cp=4, hier=None), {}), "--hierarchical-context-parallel-sizes U R"),
    ("three_hierarchical_sizes", lambda: (_mutated(_cfg(cp=4, hier=[2, 2]), hierarchical_context_parallel_sizes=[2, 2, 1]), {}),
     "exactly two sizes"),
    ("sizes_do_not_multiply_to_cp", lambda: (_cfg(cp=4, hier=[2, 1]), {}), "--context-parallel-size 4"),
    ("zero_size", lambda: (_mutated(_cfg(cp=2, hier=[2, 1]), hierarchical_context_parallel_sizes=[2, 0]), {}),
     "sizes must be >= 1"),
    ("plain_p2p_comm_type", lambda: (_cfg(cp=2, hier=[1, 2], cp_comm_type="p2p"), {}), "--cp-comm-type a2a+p2p"),
    ("heads_not_divisible_by_tp", lambda: (_mutated(_cfg(tp=2), num_attention_heads=5, num_query_groups=5), {}),
     "--tensor-model-parallel-size 2"),
    ("kv_groups_vs_tp", lambda: (_mutated(_cfg(tp=2), num_attention_heads=6, num_query_groups=3), {}),
     "--num-query-groups 3"),
    ("too_few_heads_for_ulysses_after_tp", lambda: (_cfg(tp=2, cp=4, hier=[4, 1]), {}),
     "lower U in --hierarchical-context-parallel-sizes"),
    ("attention_dropout", lambda: (_cfg(attention_dropout=0.1), {}), "--attention-dropout 0"),
    ("sliding_window", lambda: (_cfg(window_size=(8, 0)), {}), "--window-size"),
    ("sequence_parallel_without_tp", lambda: (_mutated(_cfg(), sequence_parallel=True), {}),
     "--tensor-model-parallel-size > 1"),
    ("seq_length_not_multiple_of_cp", lambda: (_cfg(pp=2, cp=4, hier=[2, 2]), {"seq_length": 62}), "--seq-length 62"),
    ("seq_length_not_multiple_of_cp_x_tp_under_sp", lambda: (_cfg(tp=2, cp=2, hier=[1, 2], sp=True), {"seq_length": 66}),
     "--seq-length 66"),
    ("no_per_token_loss", lambda: (_cfg(cp=2, hier=[2, 1], calculate_per_token_loss=False), {}),
     "--calculate-per-token-loss"),
    ("packed_with_micro_batch_2", lambda: (_cfg(cp=2, hier=[2, 1]), {"micro_batch_size": 2, "packed": True}),
     "--micro-batch-size 1"),
    ("non_uniform_shards_with_pp", lambda: (_cfg(pp=2, cp=2, hier=[2, 1]),
                                            {"mmsp": "uniform_shards=False"}), "uniform_shards"),
    ("fp8_attention_without_fp8", lambda: (_mutated(_cfg(), fp8_dot_product_attention=True), {}), "--fp8-format"),
    ("fp8_attention_without_te", lambda: (_mutated(_cfg(), fp8="hybrid", fp8_dot_product_attention=True), {}),
     "Transformer Engine"),
    ("te_baseline_without_te", lambda: (_cfg(cp=2, hier=[2, 1]), {"mmsp": "cp_attention=te_a2a_p2p"}),
     "gpt_mmsp_local"),
]


@pytest.mark.parametrize("name,make,fix", CASES, ids=[c[0] for c in CASES])
def test_rejected_with_fix(name, make, fix):
    from megatron_longvila.runtime.probes import te_available

    if "without_te" in name and te_available():
        pytest.skip("Transformer Engine is importable here")
    cfg, kw = make()
    mmsp = None
    if kw.get("mmsp") == "uniform_shards=False":
        mmsp = mmsp_config_from_megatron(cfg, uniform_shards=False)
    elif kw.get("mmsp") == "cp_attention=te_a2a_p2p":
        mmsp = mmsp_config_from_megatron(cfg, cp_attention="te_a2a_p2p")
    kw.pop("mmsp", None)
    with pytest.raises(MMSPConfigError) as e:
        validate_mmsp(cfg, mmsp, **kw)
    assert fix in str(e.value), str(e.value)


def test_valid_configs_pass():
    validate_mmsp(_cfg())
    validate_mmsp(_cfg(tp=2, pp=2, cp=4, hier=[2, 2], sp=True), seq_length=64, micro_batch_size=1, packed=True)
    m = validate_mmsp(_cfg(cp=8, hier=[4, 2]))
    assert (m.ulysses_size, m.ring_size, m.uniform_shards) == (4, 2, False)


def test_sequence_parallel_with_torch_norm_spec_rejected():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longvila.models.specs import get_gpt_mmsp_layer_spec, validate_layer_spec, LocalNorm

    cfg = _cfg(tp=2, sp=True)
    with pytest.raises(MMSPConfigError, match="--sequence-parallel"):
        validate_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), cfg)
    # The MM-SP local spec has SP-capable norms; a bare layer spec still gets Megatron's torch final norm,
    # which build_gpt_model replaces by passing final_norm.
    with pytest.raises(MMSPConfigError, match="final_layernorm"):
        validate_layer_spec(get_gpt_mmsp_layer_spec("local"), cfg)
    validate_layer_spec(get_gpt_mmsp_layer_spec("local"), cfg, final_norm=LocalNorm)


def test_te_specs_without_te_fail_loudly():
    from megatron_longvila.runtime.probes import te_available
    from megatron_longvila.models import specs

    if te_available():
        pytest.skip("Transformer Engine is importable here")
    with pytest.raises(MMSPConfigError, match="gpt_mmsp_local"):
        specs.get_gpt_mmsp_layer_spec("te")
    with pytest.raises(MMSPConfigError, match="Transformer Engine"):
        specs.get_gpt_te_cp_layer_spec()
    # `--spec megatron_longvila.models.specs gpt_te_cp` resolves (Megatron reads vars(module)[name]) and its
    # construction raises the reason instead of a KeyError deep inside Megatron.
    from megatron.core.transformer.spec_utils import build_module, import_module

    spec = import_module(("megatron_longvila.models.specs", "gpt_te_cp"))
    with pytest.raises(MMSPConfigError, match="gpt_mmsp_local"):
        build_module(spec)
    assert import_module(("megatron_longvila.models.specs", "gpt_mmsp")).submodules.self_attention.module.__name__ \
        == "MMSPSelfAttention"


def test_core_attention_rejects_unsupported_layer_options():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longvila.attention.megatron_core import MMSPCoreAttention

    cfg = _cfg()
    with pytest.raises(MMSPConfigError, match="causal"):
        MMSPCoreAttention(cfg, 1, AttnMaskType.padding, "self")
    with pytest.raises(MMSPConfigError, match="--attention-dropout 0"):
        MMSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    with pytest.raises(MMSPConfigError, match="self-attention"):
        MMSPCoreAttention(cfg, 1, AttnMaskType.causal, "cross")

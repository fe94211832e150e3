"""The attention benchmark's figures: communication equals its analytic minimum; work is balanced."""

from megatron_longvila.attention.check import AttentionCheckConfig, run_attention_check


def test_equal_length_causal_is_balanced_and_minimal():
    res = run_attention_check(AttentionCheckConfig(ulysses=2, ring=2, seq_lens=[256], heads=4, kv_heads=2,
                                                   head_dim=16, iters=1))
    assert res["comm_ratio"] == 1.0
    assert res["flops_imbalance"] <= 1.01
    assert max(res["rel_err"].values()) < 1e-5


def test_packed_mixed_lengths_are_balanced_and_minimal():
    res = run_attention_check(AttentionCheckConfig(ulysses=1, ring=4, seq_lens=[300, 1, 77, 13, 2, 150],
                                                   heads=4, kv_heads=4, head_dim=16, iters=1))
    assert res["comm_ratio"] == 1.0
    assert res["flops_imbalance"] <= 1.05
    assert max(res["rel_err"].values()) < 1e-5

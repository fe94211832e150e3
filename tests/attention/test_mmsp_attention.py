"""MM-SP attention equals single-process attention on the full sequence, forward and backward.

Tolerances (relative L2 error of out, dq, dk, dv against PyTorch's attention in float64 on the same inputs):
fp32 1e-5, bf16 2e-2.
"""

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

PACKED = [1, 2, 3, 5, 7, 11, 13, 31]  # lengths 1 and primes, several shorter than the mesh
FP32_TOL, BF16_TOL = 1e-5, 2e-2


def _run_cases(rank, world, U, R, cases):
    from megatron_longvila.attention import mmsp_attention, reference_attention
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    meshes = {}
    results = []
    for c in cases:
        rf = c.get("ring_first", False)
        if rf not in meshes:
            meshes[rf] = build_mmsp_mesh(U, R, ring_first=rf)
        mesh = meshes[rf]
        plan = plan_sequence(mesh, c["seq_lens"], uniform=c.get("uniform", False),
                             pad_to_multiple=c.get("pad", 1))
        dtype = getattr(torch, c.get("dtype", "float32"))
        g = torch.Generator().manual_seed(c.get("seed", 0))
        T, b, d = plan.total_len, c.get("batch", 2), c.get("head_dim", 8)
        q, k, v, do = [torch.randn(T, b, h, d, generator=g).to(dtype)
                       for h in (c["heads"], c["kv_heads"], c["kv_heads"], c["heads"])]
        qr, kr, vr = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(qr, kr, vr, c["seq_lens"], causal=c["causal"])
        ref.backward(do.double())
        ql, kl, vl = [plan.shard(t).detach().requires_grad_() for t in (q, k, v)]
        out = mmsp_attention(ql, kl, vl, plan, causal=c["causal"])
        out.backward(plan.shard(do))
        if plan.padded:  # pad rows produce zeros and no gradient
            n = plan.token_index().numel()
            assert out[n:].abs().max().item() == 0.0
        got = [plan.gather(x.detach()) for x in (out, ql.grad, kl.grad, vl.grad)]
        refs = [ref.detach(), qr.grad, kr.grad, vr.grad]
        errs = {name: ((a.double() - r).norm() / r.norm()).item()
                for name, a, r in zip(("out", "dq", "dk", "dv"), got, refs)}
        results.append(errs)
    return results


def _cases(U):
    cases = []
    for causal in (True, False):
        cases.append(dict(seq_lens=PACKED, heads=4, kv_heads=2, causal=causal))
        cases.append(dict(seq_lens=[37], heads=4, kv_heads=4, causal=causal, batch=1))
    cases.append(dict(seq_lens=[29, 3, 1], heads=4, kv_heads=1, causal=True, uniform=True, pad=2))
    cases.append(dict(seq_lens=[41, 1, 6], heads=4, kv_heads=2, causal=True, dtype="bfloat16", head_dim=16))
    if U == 4:
        # GQA with fewer KV heads than U, and query heads that do not divide U
        cases.append(dict(seq_lens=[23, 1, 17], heads=8, kv_heads=1, causal=True))
        cases.append(dict(seq_lens=[23, 1, 17], heads=8, kv_heads=2, causal=True))
        cases.append(dict(seq_lens=[23, 1, 17], heads=6, kv_heads=6, causal=True))
        cases.append(dict(seq_lens=[23, 1, 17], heads=6, kv_heads=2, causal=False))
        cases.append(dict(seq_lens=[19], heads=6, kv_heads=3, causal=True))
    if U > 1 and U * 2 <= 8:
        cases.append(dict(seq_lens=[19, 4], heads=4, kv_heads=2, causal=True, ring_first=True))
    return cases


@pytest.mark.parametrize("U,R", [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2)])
def test_mmsp_attention_matches_single_process(U, R):
    cases = _cases(U)
    per_rank = run_distributed(_run_cases, U * R, U, R, cases, timeout=600)
    for rank_results in per_rank:
        for case, errs in zip(cases, rank_results):
            tol = BF16_TOL if case.get("dtype") == "bfloat16" else FP32_TOL
            bad = {k: v for k, v in errs.items() if not v < tol}
            assert not bad, f"mesh {U}x{R} case {case}: relative errors {bad} exceed {tol}"


def test_single_rank_plan_is_plain_attention():
    """With a 1x1 mesh (no process group) mmsp_attention is per-document attention."""
    from megatron_longvila.attention import mmsp_attention, reference_attention
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    plan = plan_sequence(single_rank_mesh(), [5, 1, 9])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(15, 1, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(15, 1, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(15, 1, 2, 8, generator=g, dtype=torch.float64)
    out = mmsp_attention(q, k, v, plan)
    ref = reference_attention(q, k, v, [5, 1, 9])
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    # documents do not see each other: changing document 0 leaves documents 1 and 2 unchanged
    k2 = k.clone()
    k2[:5] += torch.randn(5, 1, 2, 8, generator=g, dtype=torch.float64)
    out2 = mmsp_attention(q, k2, v, plan)
    assert torch.equal(out2[5:], out[5:]) and not torch.allclose(out2[:5], out[:5])


def test_bad_inputs_fail_clearly():
    from megatron_longvila.attention import mmsp_attention
    from megatron_longvila.errors import BackendUnavailable
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    plan = plan_sequence(single_rank_mesh(), [8])
    q = torch.randn(8, 1, 6, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        mmsp_attention(q, torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), plan)
    with pytest.raises(ValueError, match="plan.shard"):
        mmsp_attention(q[:7], q[:7], q[:7], plan)
    with pytest.raises(ValueError, match=r"\[s, b, heads, d\]"):
        mmsp_attention(q[:, 0], q[:, 0], q[:, 0], plan)
    with pytest.raises(BackendUnavailable, match="unknown attention backend"):
        mmsp_attention(q, q, q, plan, backend="nope")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        mmsp_attention(q, q, q, plan, backend="torch_cuda")

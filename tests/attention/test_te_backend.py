"""Transformer Engine backend: pure helpers on CPU; te / te_fp8 against 'math' when CUDA and TE exist."""

import pytest
import torch

from megatron_longvila.plan.segments import Segments, token_coords
from megatron_longvila.attention.backends import get_backend
from megatron_longvila.runtime.probes import te_available
from megatron_longvila.attention.backends.te import (bshd_to_thd, lse_to_stats, pack_segments, stats_to_lse,
                                                     thd_to_bshd)

# --------------------------------------------------------------------------------------------------
# CPU: layout helpers
# --------------------------------------------------------------------------------------------------


def _device_token_coords(cu: torch.Tensor):
    """The backend's former computation on the device tensor (a host sync per call: int(cu[-1]) and
    repeat_interleave's output size): the reference the host plan must equal."""
    cu = cu.long()
    lens = cu[1:] - cu[:-1]
    b = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1].index_select(0, b)
    return b, pos


@pytest.mark.parametrize("cu", [[0, 3, 3, 7], [0, 5], [0, 0, 0, 2], [0, 1, 2, 3, 10], [0]])
def test_host_token_coords_equal_the_device_computation(cu):
    host = token_coords(cu)
    ref = _device_token_coords(torch.tensor(cu, dtype=torch.int32)) if len(cu) > 1 else (torch.zeros(0),) * 2
    assert all(h.dtype == torch.long and h.device.type == "cpu" for h in host)
    assert [h.tolist() for h in host] == [r.tolist() for r in ref]


def test_segments_plan_their_coordinates_once_per_device():
    seg = Segments([0, 3, 7], [0, 2, 9], causal=False)
    c = seg.device_coords("cpu")
    assert c is seg.device_coords("cpu")  # cached with the segments, as their offsets
    assert [t.tolist() for t in c.q] == [r.tolist() for r in _device_token_coords(torch.tensor([0, 3, 7]))]
    assert [t.tolist() for t in c.k] == [r.tolist() for r in _device_token_coords(torch.tensor([0, 2, 9]))]


def test_token_coords_and_bshd_round_trip():
    cu = [0, 3, 3, 7]
    coords = token_coords(cu)
    assert coords[0].tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert coords[1].tolist() == [0, 1, 2, 0, 1, 2, 3]
    x = torch.randn(7, 2, 4)
    padded = thd_to_bshd(x, coords, 3, 5)
    assert padded.shape == (3, 5, 2, 4)
    assert torch.equal(padded[2, :4], x[3:]) and padded[1].abs().sum() == 0 and padded[0, 3:].abs().sum() == 0
    assert torch.equal(bshd_to_thd(padded, coords), x)


def test_lse_stats_round_trip_packed_and_padded():
    coords = token_coords([0, 2, 7])
    lse = torch.randn(3, 7)
    packed = lse_to_stats(lse, None, 2, 5, packed=True)
    assert packed.shape == (7, 3, 1) and packed.dtype == torch.float32
    assert torch.equal(packed[4, 1, 0], lse[1, 4])
    padded = lse_to_stats(lse, coords, 2, 6, packed=False)
    assert padded.shape == (2, 3, 6, 1)
    assert torch.equal(padded[1, 2, 3, 0], lse[2, 5])  # token 5 = segment 1, position 3
    assert padded[0, :, 2:].abs().sum() == 0
    for stats in (packed, padded):
        assert torch.equal(stats_to_lse(stats, coords), lse)


def test_pack_segments_drops_empty_sides_and_gathers_only_when_needed():
    p = pack_segments([0, 3, 5], [0, 4, 6])
    assert p.cu_q == [0, 3, 5] and p.cu_k == [0, 4, 6] and p.q_index is None and p.k_index is None
    # Trailing empty-key segment: kept rows are still a prefix.
    p = pack_segments([0, 3, 5], [0, 4, 4])
    assert p.cu_q == [0, 3] and p.cu_k == [0, 4] and p.q_index is None and p.k_index is None
    # A dropped segment in the middle owning query rows forces a query gather; keys stay a prefix.
    p = pack_segments([0, 2, 4, 7], [0, 1, 1, 3])
    assert p.cu_q == [0, 2, 5] and p.cu_k == [0, 1, 3]
    assert p.q_index.tolist() == [0, 1, 4, 5, 6] and p.k_index is None
    # Empty query side with keys: the keys are skipped by a gather.
    p = pack_segments([0, 0, 2], [0, 3, 5])
    assert p.cu_q == [0, 2] and p.cu_k == [0, 2] and p.q_index is None and p.k_index.tolist() == [3, 4]
    assert pack_segments([0, 0], [0, 4]).cu_q == [0]


def test_te_module_imports_without_transformer_engine():
    # The helpers above already imported te.py; TE itself is only touched when a backend is built.
    import sys

    if not te_available():
        assert "transformer_engine" not in sys.modules


# --------------------------------------------------------------------------------------------------
# GPU: te / te_fp8 vs math
# --------------------------------------------------------------------------------------------------

needs_te = pytest.mark.skipif(not (torch.cuda.is_available() and te_available()),
                              reason="needs a CUDA device and an importable transformer_engine")

CASES = [  # (causal, cu_q, cu_k, heads, kv heads)
    (True, [0, 37, 100, 229], [0, 37, 100, 229], 8, 8),
    (True, [0, 64, 65, 192], [0, 64, 65, 192], 8, 2),       # GQA, a length-1 segment
    (False, [0, 50, 130, 131], [0, 90, 100, 177], 8, 8),    # cross lengths
    (False, [0, 128, 256], [0, 40, 300], 6, 2),              # GQA with 3 query heads per KV head
    (False, [0, 20, 20, 60], [0, 30, 45, 80], 4, 4),         # a segment with keys but no queries
]


def _run(name, causal, cu_q, cu_k, h, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    seg = Segments(cu_q, cu_k, causal)
    q = torch.randn(cu_q[-1], h, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(cu_k[-1], hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(cu_k[-1], hkv, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(cu_q[-1], h, d, device="cuda", dtype=dtype, generator=g)
    scale = d ** -0.5
    ref = get_backend("math", q)
    o_ref, l_ref = ref.forward(q.float(), k.float(), v.float(), seg, scale)
    g_ref = ref.backward(do.float(), q.float(), k.float(), v.float(), o_ref, l_ref, seg, scale)
    be = get_backend(name, q)
    o, l = be.forward(q, k, v, seg, scale)
    # The backward is fed the reference out/lse, as the ring feeds the merged ones.
    grads = be.backward(do, q, k, v, o_ref.to(dtype), l_ref, seg, scale)
    return (o, l, *grads), (o_ref, l_ref, *g_ref)


def _close(got, want, rtol):
    got, want = got.float(), want.float()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    scale = want[fin].abs().max().item() if fin.any() else 1.0
    assert err <= rtol * max(scale, 1e-6), f"max abs err {err:.3e} vs max {scale:.3e}"


@needs_te
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_te_matches_math_forward_and_backward(case, dtype):
    causal, cu_q, cu_k, h, hkv = case
    got, want = _run("te", causal, cu_q, cu_k, h, hkv, 64, dtype)
    assert got[1].dtype == torch.float32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _close(a, b, 2e-2 if name != "lse" else 1e-3)


@needs_te
@pytest.mark.parametrize("case", CASES[:4])
def test_te_fp8_matches_math_loosely(case):
    causal, cu_q, cu_k, h, hkv = case
    try:
        got, want = _run("te_fp8", causal, cu_q, cu_k, h, hkv, 128, torch.bfloat16)
    except Exception as e:  # BackendUnavailable: this GPU/cuDNN has no FP8 attention for the shape
        from megatron_longvila.errors import BackendUnavailable

        if isinstance(e, BackendUnavailable):
            pytest.skip(str(e))
        raise
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _close(a, b, 5e-2)


@needs_te
def test_te_rejects_fp32_clearly():
    from megatron_longvila.errors import BackendUnavailable

    q = torch.randn(8, 2, 64, device="cuda")
    with pytest.raises(BackendUnavailable, match="fp16/bf16"):
        get_backend("te", q).forward(q, q, q, Segments([0, 8], [0, 8], True), 0.125)

"""The local kernels agree with each other (cpu vs math, fp64) on varlen segments, forward and backward."""

import torch

from megatron_longvila.plan.segments import Segments
from megatron_longvila.attention.backends import get_backend


def test_cpu_and_math_kernels_agree_with_gqa_and_causal():
    g = torch.Generator().manual_seed(0)
    for causal, cu_q, cu_k in ((True, [0, 3, 10, 11], [0, 3, 10, 11]), (False, [0, 4, 9], [0, 7, 8])):
        seg = Segments(cu_q, cu_k, causal)
        q = torch.randn(cu_q[-1], 4, 8, generator=g, dtype=torch.float64)
        k = torch.randn(cu_k[-1], 2, 8, generator=g, dtype=torch.float64)
        v = torch.randn(cu_k[-1], 2, 8, generator=g, dtype=torch.float64)
        do = torch.randn_like(q)
        res = {}
        for name in ("cpu", "math"):
            be = get_backend(name, q)
            o, l = be.forward(q, k, v, seg, 0.3)
            res[name] = (o, l) + be.backward(do, q, k, v, o, l, seg, 0.3)
        for a, b in zip(res["cpu"], res["math"]):
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-8)


def test_segment_pairs_count_causal_triangle():
    assert Segments([0, 4], [0, 4], True).pairs() == 10
    assert Segments([0, 2, 5], [0, 3, 4], False).pairs() == 2 * 3 + 3 * 1

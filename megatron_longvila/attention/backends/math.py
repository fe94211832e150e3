"""Reference kernel in plain tensor algebra: any device, any dtype (float64 included).

It materializes each segment's score matrix, so it is for references and small problems (fp32/fp64
checks on a GPU), not for long sequences.
"""

from __future__ import annotations

import torch

from .base import acc_dtype, AttentionBackend
from ...plan.segments import Segments


def _scores(q, k, scale, causal):
    # q [Lq, H, D], k [Lk, Hkv, D] -> s [H, Lq, Lk] (float32 at least)
    h, hkv = q.shape[1], k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(acc).repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.to(acc), kk) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return s, kk


class MathBackend(AttentionBackend):
    name = "math"

    def forward(self, q, k, v, seg: Segments, scale: float):
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        h, hkv = q.shape[1], k.shape[1]
        for qa, qb, ka, kb in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
            if qb == qa or kb == ka:
                continue
            s, _ = _scores(q[qa:qb], k[ka:kb], scale, seg.causal)
            l = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - l.unsqueeze(-1))
            vv = v[ka:kb].to(s.dtype).repeat_interleave(h // hkv, dim=1)
            out[qa:qb] = torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)
            lse[:, qa:qb] = l.to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        h, hkv = q.shape[1], k.shape[1]
        g = h // hkv
        for qa, qb, ka, kb in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
            if qb == qa or kb == ka:
                continue
            s, kk = _scores(q[qa:qb], k[ka:kb], scale, seg.causal)
            p = torch.exp(s - lse[:, qa:qb].to(s.dtype).unsqueeze(-1))
            do = dout[qa:qb].to(s.dtype)
            vv = v[ka:kb].to(s.dtype).repeat_interleave(g, dim=1)
            dvv = torch.einsum("hqk,qhd->khd", p, do)
            dp = torch.einsum("qhd,khd->hqk", do, vv)
            delta = (do * out[qa:qb].to(s.dtype)).sum(-1).transpose(0, 1)  # [H, Lq]
            ds = p * (dp - delta.unsqueeze(-1)) * scale
            dq[qa:qb] += torch.einsum("hqk,khd->qhd", ds, kk).to(q.dtype)
            dkk = torch.einsum("hqk,qhd->khd", ds, q[qa:qb].to(s.dtype))
            dk[ka:kb] += dkk.view(kb - ka, hkv, g, -1).sum(2).to(k.dtype)
            dv[ka:kb] += dvv.view(kb - ka, hkv, g, -1).sum(2).to(v.dtype)
        return dq, dk, dv

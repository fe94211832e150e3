"""CPU kernel: ATen's flash attention for CPU, which returns the log-sum-exp and has a backward op."""

from __future__ import annotations

import torch

from .base import acc_dtype, AttentionBackend
from ...errors import BackendUnavailable
from ...plan.segments import Segments

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    # [T, H, D] -> [1, H, T, D]
    return x.transpose(0, 1).unsqueeze(0)


def _segments(seg: Segments):
    for qa, qb, ka, kb in zip(seg.cu_q, seg.cu_q[1:], seg.cu_k, seg.cu_k[1:]):
        if qb > qa and kb > ka:
            yield qa, qb, ka, kb


class CPUBackend(AttentionBackend):
    name = "cpu"

    def _check(self, q):
        if q.device.type != "cpu":
            raise BackendUnavailable(f"backend 'cpu' got a tensor on {q.device}; use backend='auto' or 'torch_cuda'")

    def forward(self, q, k, v, seg: Segments, scale: float):
        self._check(q)
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype))
        for qa, qb, ka, kb in _segments(seg):
            o, l = _fwd(_bhsd(q[qa:qb]), _bhsd(k[ka:kb]), _bhsd(v[ka:kb]), 0.0, seg.causal, scale=scale)
            out[qa:qb] = o[0].transpose(0, 1)
            lse[:, qa:qb] = l[0].to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        self._check(q)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qa, qb, ka, kb in _segments(seg):
            g = _bwd(_bhsd(dout[qa:qb]), _bhsd(q[qa:qb]), _bhsd(k[ka:kb]), _bhsd(v[ka:kb]),
                     _bhsd(out[qa:qb]), lse[:, qa:qb].to(acc_dtype(q.dtype)).unsqueeze(0).contiguous(), 0.0, seg.causal, scale=scale)
            dq[qa:qb] += g[0][0].transpose(0, 1)
            dk[ka:kb] += g[1][0].transpose(0, 1)
            dv[ka:kb] += g[2][0].transpose(0, 1)
        return dq, dk, dv

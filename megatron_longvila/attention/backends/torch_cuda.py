"""CUDA kernel: PyTorch's built-in flash attention (varlen, returns the log-sum-exp); no extra package."""

from __future__ import annotations

import torch

from .base import AttentionBackend
from ...errors import BackendUnavailable
from ...plan.segments import Segments


class TorchCUDABackend(AttentionBackend):
    name = "torch_cuda"

    def _check(self, q):
        if q.device.type != "cuda":
            raise BackendUnavailable(f"backend 'torch_cuda' needs CUDA tensors, got {q.device}; use 'cpu' or 'auto'")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnavailable(f"backend 'torch_cuda' (flash) needs fp16/bf16, got {q.dtype}; "
                                     "use backend='math' for fp32/fp64 on a GPU")
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            raise BackendUnavailable(f"flash attention needs head dim <= 256 and a multiple of 8, got {q.shape[-1]}")

    def forward(self, q, k, v, seg: Segments, scale: float):
        self._check(q)
        cu_q, cu_k = seg.device_tensors(q.device)
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, seg.max_q, seg.max_k, 0.0, seg.causal,
            False, scale=scale)
        # Varlen flash returns lse as [H, Tq].
        return out, lse.float()

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        self._check(q)
        cu_q, cu_k = seg.device_tensors(q.device)
        empty = torch.empty(0, device=q.device)
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
            cu_q, cu_k, seg.max_q, seg.max_k, 0.0, seg.causal, rng, empty, scale=scale)
        return dq, dk, dv

"""The local attention kernel interface used inside the ring.

Every backend computes attention over *segments* (plan.segments.Segments): varlen batches in the packed "thd" layout, where
segment i pairs queries q[cu_q[i]:cu_q[i+1]] with keys/values k[cu_k[i]:cu_k[i+1]], and returns the
natural-log log-sum-exp of each query row so partial results can be merged across ring steps.

Shapes: q [Tq, H, D], k and v [Tk, Hkv, D] with H % Hkv == 0 (query head h uses KV head h // (H/Hkv));
out [Tq, H, D] in q's dtype; lse [H, Tq] in `acc_dtype(q.dtype)` (float32, float64 for float64 inputs). `causal` is only ever used with equal query and key
segment lengths (the diagonal block of a zigzag ring step), so top-left and bottom-right alignment agree.
The backward receives the *final* (merged) out and lse of the rows, which makes per-block gradients exact.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ...errors import BackendUnavailable
from ...plan.segments import Segments

__all__ = ["Segments", "acc_dtype", "AttentionBackend", "BackendUnavailable"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for log-sum-exp, merged outputs and traveling gradients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionBackend:
    """A local attention kernel returning the log-sum-exp. Subclasses implement `forward`/`backward`."""

    name = "base"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, seg: Segments, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

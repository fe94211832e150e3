"""The local attention kernel interface used inside the ring.

Every backend computes attention over *segments*: varlen batches in the packed "thd" layout, where
segment i pairs queries q[cu_q[i]:cu_q[i+1]] with keys/values k[cu_k[i]:cu_k[i+1]], and returns the
natural-log log-sum-exp of each query row so partial results can be merged across ring steps.

Shapes: q [Tq, H, D], k and v [Tk, Hkv, D] with H % Hkv == 0 (query head h uses KV head h // (H/Hkv));
out [Tq, H, D] in q's dtype; lse [H, Tq] in `acc_dtype(q.dtype)` (float32, float64 for float64 inputs). `causal` is only ever used with equal query and key
segment lengths (the diagonal block of a zigzag ring step), so top-left and bottom-right alignment agree.
The backward receives the *final* (merged) out and lse of the rows, which makes per-block gradients exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch


@dataclass
class Segments:
    """Varlen segment boundaries of one block computation."""

    cu_q: List[int]
    """Cumulative query offsets, length n+1."""
    cu_k: List[int]
    """Cumulative key offsets, length n+1."""
    causal: bool
    """Causal mask inside every segment (query and key lengths are then equal)."""
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def max_q(self) -> int:
        return max((b - a for a, b in zip(self.cu_q, self.cu_q[1:])), default=0)

    @property
    def max_k(self) -> int:
        return max((b - a for a, b in zip(self.cu_k, self.cu_k[1:])), default=0)

    def pairs(self) -> int:
        """Query-key pairs the block computes (the FLOP count is 4 * D * heads * pairs forward)."""
        n = 0
        for qa, qb, ka, kb in zip(self.cu_q, self.cu_q[1:], self.cu_k, self.cu_k[1:]):
            lq, lk = qb - qa, kb - ka
            n += lq * (lq + 1) // 2 if self.causal else lq * lk
        return n

    def device_tensors(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                                       torch.tensor(self.cu_k, dtype=torch.int32, device=device))
        return self._device_cache[key]


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


class BackendUnavailable(RuntimeError):
    """A requested attention backend cannot run here; the message says why and what to use instead."""

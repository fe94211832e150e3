"""Varlen segments: the "thd" description of one attention block that every local kernel takes.

Segment i pairs queries q[cu_q[i]:cu_q[i+1]] with keys/values k[cu_k[i]:cu_k[i+1]]; `causal` (used only with equal
query and key segment lengths: the diagonal block of a zigzag ring step) masks inside every segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch

__all__ = ["Segments"]


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
        """(cu_q, cu_k) as int32 tensors on `device` (built once per device)."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                                       torch.tensor(self.cu_k, dtype=torch.int32, device=device))
        return self._device_cache[key]

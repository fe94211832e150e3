"""Varlen segments: the "thd" description of one attention block that every local kernel takes.

Segment i pairs queries q[cu_q[i]:cu_q[i+1]] with keys/values k[cu_k[i]:cu_k[i+1]]; `causal` (used only with equal
query and key segment lengths: the diagonal block of a zigzag ring step) masks inside every segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch

from ..runtime.device import host_to_device

__all__ = ["Segments", "SegmentCoords", "token_coords"]


def token_coords(cu: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens described by the cumulative offsets `cu` (a host list): each token's (segment index,
    position in its segment), int64 host tensors. Planned on the host: a device computation needs the token count
    (cu[-1]) on the host, a synchronization per call."""
    lens = [b - a for a, b in zip(cu, cu[1:])]
    seg = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.long), torch.tensor(lens, dtype=torch.long))
    pos = torch.arange(int(cu[-1]) if len(cu) else 0, dtype=torch.long) - \
        torch.tensor(list(cu[:-1]), dtype=torch.long)[seg]
    return seg, pos


@dataclass(frozen=True)
class SegmentCoords:
    """Padded-layout coordinates of a block's packed tokens, on one device (Transformer Engine's FP8 attention pads
    each segment to [segments, max_len])."""

    q: Tuple[torch.Tensor, torch.Tensor]
    """(segment, position) of each query token."""
    k: Tuple[torch.Tensor, torch.Tensor]
    """(segment, position) of each key/value token."""

    @classmethod
    def of(cls, cu_q: Sequence[int], cu_k: Sequence[int], device) -> "SegmentCoords":
        """Planned on the host, copied to `device` asynchronously (pinned memory)."""
        return cls(q=tuple(host_to_device(t, device) for t in token_coords(cu_q)),
                   k=tuple(host_to_device(t, device) for t in token_coords(cu_k)))


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
        """(cu_q, cu_k) as int32 tensors on `device` (built once per device, copied without a host sync)."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (host_to_device(torch.tensor(self.cu_q, dtype=torch.int32), device),
                                       host_to_device(torch.tensor(self.cu_k, dtype=torch.int32), device))
        return self._device_cache[key]

    def device_coords(self, device) -> SegmentCoords:
        """The tokens' padded-layout coordinates on `device` (built once per device; see SegmentCoords)."""
        key = ("coords", str(device))
        if key not in self._device_cache:
            self._device_cache[key] = SegmentCoords.of(self.cu_q, self.cu_k, device)
        return self._device_cache[key]

"""Ulysses geometry: how query and KV heads spread over a Ulysses group, and which rows of a received ring buffer are
real tokens.

Heads are split over the U ranks as evenly as possible (H need not divide by U). For GQA, each rank receives exactly
the KV heads its query heads use; a KV head used by several ranks is sent to each of them.

    HeadLayout, head_layout(num_q, num_kv, ulysses_size) -> HeadLayout
    compact_index(layout, ring_rank, device) -> LongTensor | None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .sequence import SequenceLayout, split_even

__all__ = ["HeadLayout", "head_layout", "compact_index"]


@dataclass(frozen=True)
class HeadLayout:
    """How query and KV heads are spread over a Ulysses group."""

    q_ranges: Tuple[Tuple[int, int], ...]
    """Query heads [start, end) of each Ulysses rank."""
    kv_heads: Tuple[Tuple[int, ...], ...]
    """KV head indices each Ulysses rank receives (repeats allowed), ordered so that local query head i
    uses local KV head i // (local query heads / local KV heads)."""


def head_layout(num_q: int, num_kv: int, ulysses_size: int) -> HeadLayout:
    """Query heads in near-equal contiguous ranges, and the KV heads each range needs."""
    if num_kv < 1 or num_q % num_kv:
        raise ValueError(f"query heads ({num_q}) must be a multiple of KV heads ({num_kv})")
    group = num_q // num_kv
    sizes = split_even(num_q, ulysses_size)
    q_ranges, kv_heads, start = [], [], 0
    for n in sizes:
        needed = [h // group for h in range(start, start + n)]
        uniq = sorted(set(needed))
        runs = [needed.count(x) for x in uniq]
        if runs and all(c == runs[0] for c in runs):
            kv = tuple(uniq)  # uniform local grouping: send each KV head once
        else:
            kv = tuple(needed)  # ragged grouping: one KV head per local query head
        q_ranges.append((start, start + n))
        kv_heads.append(kv)
        start += n
    return HeadLayout(tuple(q_ranges), tuple(kv_heads))


def compact_index(layout: SequenceLayout, ring_rank: int, device) -> Optional[torch.Tensor]:
    """Rows of the received (pad-interleaved) ring buffer that hold real tokens; None when nothing is padded."""
    if not layout.padded:
        return None

    def build():
        real, local = layout.ring_pad_layout(ring_rank)
        idx, base = [], 0
        for n, m in zip(real, local):
            idx.append(torch.arange(base, base + n))
            base += m
        return torch.cat(idx)

    return layout.on_device(f"compact_{ring_rank}", device, build)

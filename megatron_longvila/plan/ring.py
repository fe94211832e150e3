"""The work of each zigzag ring step: which query rows of a ring buffer meet which key rows of the held KV buffer.

Ring rank r holds, for every document, the zigzag chunks r and 2R-1-r (its "ring buffer", plan.sequence). At step s
it holds the KV buffer of ring rank j = r - s and computes, per document:
- j == r: causal attention of its buffer on itself (the two chunks are in position order);
- j <  r: all its queries against chunk j only (chunk 2R-1-j lies after both of its chunks);
- j >  r: only its late chunk's queries against both of j's chunks (its early chunk precedes them).
So every rank does the same work at every step. Without a causal mask every step is all-against-all.

    Block, ring_step_block(layout, r, j, causal) -> Block     (cached on the layout)
    prepare_ring_blocks(layout, ring_rank, device)            this rank's blocks, their indices on `device`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Union

import torch

from ..runtime.device import host_to_device
from .segments import Segments
from .sequence import SequenceLayout

__all__ = ["Rows", "Block", "ring_step_block", "prepare_ring_blocks"]

Rows = Union[None, slice, torch.Tensor]
"""Rows of a buffer taking part in a block: None (all, in order), a slice (one contiguous range: a view, no
copy) or a LongTensor of row indices (several documents)."""


@dataclass
class Block:
    """The work of one ring step: which query rows meet which key rows, in varlen segments."""

    q_rows: Rows
    """Rows of the local ring buffer taking part."""
    k_rows: Rows
    """Rows of the held KV buffer taking part."""
    seg: Segments
    """Segment boundaries inside the gathered rows."""
    nq: int
    """Number of query rows taking part."""
    _device_rows: Dict[tuple, Tuple[Rows, Rows]] = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return len(self.seg.cu_q) <= 1

    def rows_on(self, device) -> Tuple[Rows, Rows]:
        """(q_rows, k_rows) with index tensors on `device` (copied once; the block lives in its layout's cache)."""
        device = torch.device(device)
        key = (device.type, device.index)
        hit = self._device_rows.get(key)
        if hit is None:
            def move(rows):
                return host_to_device(rows, device) if isinstance(rows, torch.Tensor) else rows

            hit = self._device_rows[key] = (move(self.q_rows), move(self.k_rows))
        return hit


def _rows(ranges, total) -> Rows:
    """The cheapest description of the rows covered by `ranges` (sorted, disjoint)."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return None if (a, b) == (0, total) else slice(a, b)
    idx = torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.long)
    if idx.numel() == total and torch.equal(idx, torch.arange(total)):
        return None
    return idx


def _ranges_to_block(q_ranges, k_ranges, q_total, k_total, causal) -> Block:
    cu_q, cu_k, qr, kr = [0], [0], [], []
    for (qa, qb), (ka, kb) in zip(q_ranges, k_ranges):
        if qb <= qa or kb <= ka:
            continue
        qr.append((qa, qb))
        kr.append((ka, kb))
        cu_q.append(cu_q[-1] + qb - qa)
        cu_k.append(cu_k[-1] + kb - ka)
    return Block(_rows(qr, q_total), _rows(kr, k_total), Segments(cu_q, cu_k, causal), cu_q[-1])


def ring_step_block(layout: SequenceLayout, r: int, j: int, causal: bool) -> Block:
    """The block ring rank r computes against the KV buffer of ring rank j (cached on the layout)."""
    key = ("ring_block", r, j, causal)
    cache = layout._block_cache
    if key in cache:
        return cache[key]
    mine = {d.doc: d for d in layout.ring_docs[r]}
    theirs = {d.doc: d for d in layout.ring_docs[j]}
    q_ranges, k_ranges = [], []
    for doc, dq in mine.items():
        dk = theirs.get(doc)
        if dk is None:
            continue
        if not causal or j == r:
            q_ranges.append((dq.offset, dq.offset + dq.length))
            k_ranges.append((dk.offset, dk.offset + dk.length))
        elif j < r:
            q_ranges.append((dq.offset, dq.offset + dq.length))
            k_ranges.append((dk.offset, dk.offset + dk.len_a))
        else:
            q_ranges.append((dq.offset + dq.len_a, dq.offset + dq.length))
            k_ranges.append((dk.offset, dk.offset + dk.length))
    blk = _ranges_to_block(q_ranges, k_ranges, layout.ring_lens[r], layout.ring_lens[j], causal and j == r)
    cache[key] = blk
    return blk


def prepare_ring_blocks(layout: SequenceLayout, ring_rank: int, device, coords: bool = False) -> None:
    """Build ring rank `ring_rank`'s blocks (both masks) and put their index tensors on `device` (with `coords`, also
    the padded-layout coordinates Transformer Engine's FP8 attention takes), so no kernel call copies from the host."""
    for j in range(layout.ring_size):
        for causal in (True, False):
            blk = ring_step_block(layout, ring_rank, j, causal)
            blk.rows_on(device)
            if not blk.empty and torch.device(device).type != "cpu":
                blk.seg.device_tensors(device)
                if coords:
                    blk.seg.device_coords(device)

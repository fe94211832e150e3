"""Zigzag ring attention over the ring group, per document, with a ring backward.

Each ring rank r holds, for every document, the zigzag chunks r and 2R-1-r (its "ring buffer", see
parallel/sharding.py). At step s it holds the KV buffer of ring rank j = r - s and computes, per document:
- j == r: causal attention of its buffer on itself (the two chunks are in position order);
- j <  r: all its queries against chunk j only (chunk 2R-1-j lies after both of its chunks);
- j >  r: only its late chunk's queries against both of j's chunks (its early chunk precedes them).
So every rank does the same work at every step. Without a causal mask every step is all-against-all.
Partial results are merged by log-sum-exp. The next KV buffer is in flight while the current one is
computed. The backward is also a ring: KV travels again, and the dK/dV accumulator of each block follows
one hop behind it, starting at the first non-owner and arriving home after R-1 hops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Union

import torch

from ..parallel import comm
from ..parallel.sharding import SequencePlan, host_to_device
from .backends import AttentionBackend, Segments
from .backends.base import acc_dtype


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
        """(q_rows, k_rows) with index tensors on `device` (copied once; the block lives in its plan's cache)."""
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


def ring_step_block(plan: SequencePlan, r: int, j: int, causal: bool) -> Block:
    """The block ring rank r computes against the KV buffer of ring rank j (cached on the plan)."""
    key = ("ring_block", r, j, causal)
    cache = plan._block_cache
    if key in cache:
        return cache[key]
    mine = {d.doc: d for d in plan.ring_docs[r]}
    theirs = {d.doc: d for d in plan.ring_docs[j]}
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
    blk = _ranges_to_block(q_ranges, k_ranges, plan.ring_lens[r], plan.ring_lens[j], causal and j == r)
    cache[key] = blk
    return blk


# Attention work actually computed by this rank (query-key pairs x heads x head dim), for benchmarks.
ATTENTION_STATS: Dict[str, int] = {"fwd_flops": 0, "bwd_flops": 0}


def reset_attention_stats() -> None:
    ATTENTION_STATS["fwd_flops"] = 0
    ATTENTION_STATS["bwd_flops"] = 0


def prepare_ring_blocks(plan: SequencePlan, device) -> None:
    """Build this rank's ring blocks (both masks) and put their index tensors on `device` (plan.to does this)."""
    r = plan.mesh.ring_rank
    for j in range(plan.ring_size):
        for causal in (True, False):
            blk = ring_step_block(plan, r, j, causal)
            blk.rows_on(device)
            if not blk.empty and torch.device(device).type != "cpu":
                blk.seg.device_tensors(device)


def _take(x: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    """Rows of x; index tensors must already be on x's device (Block.rows_on)."""
    if rows is None:
        return x
    if isinstance(rows, slice):
        return x.narrow(dim, rows.start, rows.stop - rows.start)
    return x.index_select(dim, rows)


def _add_rows(acc: torch.Tensor, rows: Rows, val: torch.Tensor) -> None:
    if rows is None:
        acc.add_(val)
    elif isinstance(rows, slice):
        acc.narrow(0, rows.start, rows.stop - rows.start).add_(val)
    else:
        acc.index_add_(0, rows, val)


def _merge(out_acc, lse_acc, o, l, rows: Rows):
    """Merge a partial (o [n,H,D], l [H,n]) into the accumulators at `rows` by log-sum-exp."""
    if rows is None or isinstance(rows, slice):
        oa, la = _take(out_acc, rows), _take(lse_acc, rows, dim=1)  # views: merged in place
        new = torch.logaddexp(la, l)
        oa.mul_(torch.exp(la - new).transpose(0, 1).unsqueeze(-1))
        oa.add_(o.to(oa.dtype) * torch.exp(l - new).transpose(0, 1).unsqueeze(-1))
        la.copy_(new)
        return
    index = rows
    la = lse_acc.index_select(1, index)
    new = torch.logaddexp(la, l)
    oa = out_acc.index_select(0, index) * torch.exp(la - new).transpose(0, 1).unsqueeze(-1)
    oa = oa + o.to(oa.dtype) * torch.exp(l - new).transpose(0, 1).unsqueeze(-1)
    out_acc.index_copy_(0, index, oa)
    lse_acc.index_copy_(1, index, new)


def _post_kv(plan, r, s, cur_k, cur_v, group, kind):
    """Post the exchange that brings step s+1's KV buffer (ring rank r-s-1's) while step s computes."""
    R = plan.ring_size
    if s >= R - 1:
        return None, None, None
    n_next = plan.ring_lens[(r - s - 1) % R]
    nk = cur_k.new_empty((n_next,) + tuple(cur_k.shape[1:]))
    nv = cur_v.new_empty((n_next,) + tuple(cur_v.shape[1:]))
    return comm.ring_exchange([cur_k, cur_v], [nk, nv], group, kind=kind), nk, nv


class RingAttention(torch.autograd.Function):
    """Zigzag ring attention on compact ring buffers in [S, heads, D] layout (batch folded into heads)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: SequencePlan, ring_group, causal: bool, scale: float,
                backend: AttentionBackend):
        R = plan.ring_size
        r = plan.mesh.ring_rank
        acc = acc_dtype(q.dtype)
        out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
        cur_k, cur_v = k.contiguous(), v.contiguous()
        flops = 0
        for s in range(R):
            j = (r - s) % R
            handle, nk, nv = _post_kv(plan, r, s, cur_k, cur_v, ring_group, "kv")
            blk = ring_step_block(plan, r, j, causal)
            if not blk.empty and q.shape[1] > 0:
                q_rows, k_rows = blk.rows_on(q.device)
                o, l = backend.forward(_take(q, q_rows), _take(cur_k, k_rows), _take(cur_v, k_rows), blk.seg, scale)
                _merge(out_acc, lse_acc, o, l, q_rows)
                flops += 4 * blk.seg.pairs() * q.shape[1] * q.shape[2]
            if handle is not None:
                handle.wait()
                cur_k, cur_v = nk, nv
        ATTENTION_STATS["fwd_flops"] += flops
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.plan, ctx.ring_group, ctx.causal, ctx.scale, ctx.backend = plan, ring_group, causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, causal, scale, backend = ctx.plan, ctx.ring_group, ctx.causal, ctx.scale, ctx.backend
        R = plan.ring_size
        r = plan.mesh.ring_rank
        dout = dout.contiguous()
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        acc_shape = tuple(k.shape[1:])
        cur_k, cur_v = k.contiguous(), v.contiguous()
        dkv_home = None
        acc_handle, acc_recv = None, None
        flops = 0
        for s in range(R):
            j = (r - s) % R
            kv_handle, nk, nv = _post_kv(plan, r, s, cur_k, cur_v, group, "kv_bwd")
            blk = ring_step_block(plan, r, j, causal)
            n_j = plan.ring_lens[j]
            dk_part = torch.zeros((n_j,) + acc_shape, dtype=acc, device=q.device)
            dv_part = torch.zeros((n_j,) + acc_shape, dtype=acc, device=q.device)
            if not blk.empty and q.shape[1] > 0:
                qi, ki = blk.rows_on(q.device)
                g_q, g_k, g_v = backend.backward(
                    _take(dout, qi), _take(q, qi), _take(cur_k, ki), _take(cur_v, ki),
                    _take(out, qi), _take(lse, qi, dim=1), blk.seg, scale)
                _add_rows(dq, qi, g_q.to(acc))
                _add_rows(dk_part, ki, g_k.to(acc))
                _add_rows(dv_part, ki, g_v.to(acc))
                flops += 10 * blk.seg.pairs() * q.shape[1] * q.shape[2]
            if s == 0:
                dkv_home = (dk_part, dv_part)
            else:
                if acc_handle is not None:
                    acc_handle.wait()
                    dk_part.add_(acc_recv[0])
                    dv_part.add_(acc_recv[1])
                # Send this block's accumulator on; receive the next step's (or, last, our own block's).
                n_recv = plan.ring_lens[(r - s - 1) % R]
                acc_recv = (dk_part.new_empty((n_recv,) + acc_shape), dv_part.new_empty((n_recv,) + acc_shape))
                acc_handle = comm.ring_exchange([dk_part, dv_part], list(acc_recv), group, kind="dkv")
                acc_send_keepalive = (dk_part, dv_part)  # noqa: F841  buffers must live until wait()
            if kv_handle is not None:
                kv_handle.wait()
                cur_k, cur_v = nk, nv
        dk, dv = dkv_home
        if acc_handle is not None:
            acc_handle.wait()
            dk = dk + acc_recv[0]
            dv = dv + acc_recv[1]
        ATTENTION_STATS["bwd_flops"] += flops
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None

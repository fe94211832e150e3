"""Zigzag ring attention over the ring group, per document, with a ring backward.

The blocks each ring step computes (which query rows of this rank's ring buffer meet which key rows of the held
KV buffer, per document, balanced over the ring) are planned in plan.ring. Partial results are merged by
log-sum-exp. The next KV buffer is in flight while the current one is computed. The backward is also a ring: KV
travels again, and the dK/dV accumulator of each block follows one hop behind it, starting at the first non-owner
and arriving home after R-1 hops.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..parallel import comm
from ..parallel.sharding import SequencePlan
from ..plan.ring import Rows, ring_step_block
from .backends import AttentionBackend
from .backends.base import acc_dtype

__all__ = ["RingAttention", "ATTENTION_STATS", "reset_attention_stats"]


# Attention work actually computed by this rank (query-key pairs x heads x head dim), for benchmarks.
ATTENTION_STATS: Dict[str, int] = {"fwd_flops": 0, "bwd_flops": 0}


def reset_attention_stats() -> None:
    ATTENTION_STATS["fwd_flops"] = 0
    ATTENTION_STATS["bwd_flops"] = 0


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

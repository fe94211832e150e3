"""Ulysses all-to-all: sequence-sharded [s, b, H, d] <-> head-sharded ring buffer [S_ring, b, h, d].

Heads are split over the U ranks of a Ulysses group as evenly as possible (H need not divide by U; the split is
plan.ulysses.head_layout). For GQA, each rank receives exactly the KV heads its query heads use; a KV head used by
several ranks is sent to each of them, and the backward sums its gradients (autograd does, through the index
selection).
"""

from __future__ import annotations

import torch

from ..parallel import comm
from ..parallel.sharding import SequencePlan
from ..plan.ulysses import compact_index, head_layout

__all__ = ["seq_to_heads", "heads_to_seq", "head_layout"]


def _select_heads(x: torch.Tensor, heads) -> torch.Tensor:
    """x[:, :, heads] from runs of consecutive heads as views: no index tensor to build on the device (which
    would be a host-to-device copy, hence a synchronization, in every layer)."""
    heads = list(heads)
    runs, start = [], 0
    for i in range(1, len(heads) + 1):
        if i == len(heads) or heads[i] != heads[i - 1] + 1:
            runs.append(x[:, :, heads[start]:heads[i - 1] + 1])
            start = i
    if len(runs) == 1:
        return runs[0]
    return torch.cat(runs, dim=2) if runs else x[:, :, :0]


def seq_to_heads(x: torch.Tensor, heads_per_rank, plan: SequencePlan, group, kind: str) -> torch.Tensor:
    """[s_local, b, H, d] on each Ulysses rank -> compact ring buffer [S_ring, b, h_mine, d]."""
    mesh = plan.mesh
    U, u, r = mesh.ulysses_size, mesh.ulysses_rank, mesh.ring_rank
    s, b, _, d = x.shape
    if U == 1:
        y = _select_heads(x, heads_per_rank[0])
    else:
        _, local = plan.ring_pad_layout(r)
        parts = [_select_heads(x, heads_per_rank[t]).reshape(-1) for t in range(U)]
        in_splits = [p.numel() for p in parts]
        h_me = len(heads_per_rank[u])
        out_splits = [local[t] * b * h_me * d for t in range(U)]
        flat = comm.all_to_all_autograd(torch.cat(parts), out_splits, in_splits, group, kind)
        y = flat.view(sum(local), b, h_me, d)
    idx = compact_index(plan, r, x.device)
    return y if idx is None else y.index_select(0, idx)


def heads_to_seq(y: torch.Tensor, q_ranges, plan: SequencePlan, group, kind: str) -> torch.Tensor:
    """Compact ring buffer [S_ring, b, h_mine, d] -> [s_local, b, H, d] (pads zero)."""
    mesh = plan.mesh
    U, u, r = mesh.ulysses_size, mesh.ulysses_rank, mesh.ring_rank
    _, b, h_me, d = y.shape
    idx = compact_index(plan, r, y.device)
    if idx is not None:
        real, local = plan.ring_pad_layout(r)
        full = y.new_zeros((sum(local), b, h_me, d))
        y = full.index_copy(0, idx, y)
    if U == 1:
        return y
    _, local = plan.ring_pad_layout(r)
    s_me = local[u]
    in_splits = [local[t] * b * h_me * d for t in range(U)]
    out_splits = [s_me * b * (hb - ha) * d for ha, hb in q_ranges]
    flat = comm.all_to_all_autograd(y.contiguous(), out_splits, in_splits, group, kind)
    pieces = torch.split(flat, out_splits)
    return torch.cat([p.view(s_me, b, hb - ha, d) for p, (ha, hb) in zip(pieces, q_ranges)], dim=2)

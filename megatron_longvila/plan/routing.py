"""Stage 2 of MM-SP, the plan: which visual-embedding rows each CP rank sends to which token owner and where the
rows it receives go (parallel.routing runs the exchange, one autograd-aware all-to-all).

Every embedding row crosses the network at most once (zero times when its encoder rank also owns its
token), so the bytes moved are the minimum for the given frame assignment; the backward is the same
all-to-all with the roles swapped and sends each gradient row back to the rank that encoded it.

The plan is computed identically on every CP rank from metadata every rank has (frame owners, frame token
positions, the sequence plan), so no handshake is needed. A rank may send or receive nothing; it still
takes part in the collective, forward and backward, which is why `route` must be called on every CP rank
whenever any rank has visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import RoutingError
from ..runtime.device import host_to_device
from .sequence import SequenceLayout

__all__ = ["RoutingPlan", "build_routing_plan", "RoutingError"]


@dataclass
class RoutingPlan:
    """One CP rank's part of the stage-2 exchange (plus whole-group figures for reporting)."""

    cp_rank: int
    """This rank's index in the CP group."""
    cp_size: int
    """P: ranks in the CP group."""
    send_rows: torch.Tensor
    """Rows of this rank's visual-embedding buffer (its frames, in frame order) in send order."""
    send_counts: List[int]
    """Rows sent to each CP rank (including itself)."""
    recv_counts: List[int]
    """Rows received from each CP rank (including itself)."""
    recv_local_index: torch.Tensor
    """Local token index (in this rank's shard) of each received row, in receive order."""
    local_rows: int
    """Rows in this rank's visual-embedding buffer (sum of its frames' token counts)."""
    total_rows: int
    """Visual token rows in the whole micro-batch."""
    cross_rows: int
    """Rows whose encoding rank is not their token owner, over the whole group: the minimum traffic."""
    cross_rows_sent: List[int]
    """Per rank: rows it sends to other ranks."""

    def to(self, device) -> "RoutingPlan":
        """Put the two index tensors the exchange uses on `device` (once, before the step); returns self."""
        self.send_rows = host_to_device(self.send_rows, device)
        self.recv_local_index = host_to_device(self.recv_local_index, device)
        return self

    def bytes_sent(self, hidden: int, element_size: int) -> int:
        """Bytes this rank sends to other ranks in the forward (the backward sends what it receives)."""
        return self.cross_rows_sent[self.cp_rank] * hidden * element_size

    def bytes_received(self, hidden: int, element_size: int) -> int:
        """Bytes this rank receives from other ranks in the forward (= what it sends in the backward)."""
        return (sum(self.recv_counts) - self.recv_counts[self.cp_rank]) * hidden * element_size

    def min_bytes_total(self, hidden: int, element_size: int) -> int:
        """Bytes the whole group must move in one direction: each cross-rank row exactly once."""
        return self.cross_rows * hidden * element_size


def build_routing_plan(frame_owner: Sequence[int], frame_positions: Sequence[torch.Tensor],
                       plan: SequenceLayout, cp_rank: Optional[int] = None) -> RoutingPlan:
    """Build the stage-2 exchange for one CP rank.

    Args:
        frame_owner: the encoding CP rank of each frame (stage-1 `FrameAssignment.owner`).
        frame_positions: per frame, the global positions (in the packed sequence) of its visual tokens, in
            the order the projector emits them.
        plan: the LLM's sequence layout (`plan_sequence`'s plan is one); its `token_index(r)` says which rank owns
            what.
        cp_rank: the rank to plan for (default: the layout's own CP rank).
    """
    P = plan.cp_size
    me = plan.cp_rank if cp_rank is None else cp_rank
    if len(frame_owner) != len(frame_positions):
        raise RoutingError(f"{len(frame_owner)} frame owners for {len(frame_positions)} frames")
    total = plan.total_len

    owner_of = torch.full((total,), -1, dtype=torch.long)
    local_of = torch.full((total,), -1, dtype=torch.long)
    for r in range(P):
        idx = plan.token_index(r)
        owner_of[idx] = r
        local_of[idx] = torch.arange(idx.numel())

    srcs, poss, rows = [], [], []
    next_row = [0] * P
    for f, (o, pos) in enumerate(zip(frame_owner, frame_positions)):
        if not (0 <= o < P):
            raise RoutingError(f"frame {f} is owned by rank {o}, outside the CP group of size {P}")
        pos = torch.as_tensor(pos, dtype=torch.long).reshape(-1)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= total):
            raise RoutingError(f"frame {f} has token positions outside the sequence of {total} tokens")
        srcs.append(torch.full((pos.numel(),), o, dtype=torch.long))
        poss.append(pos)
        rows.append(torch.arange(next_row[o], next_row[o] + pos.numel()))
        next_row[o] += pos.numel()
    if poss:
        src = torch.cat(srcs)
        pos = torch.cat(poss)
        row = torch.cat(rows)
    else:
        src = pos = row = torch.zeros(0, dtype=torch.long)
    if pos.numel() != torch.unique(pos).numel():
        raise RoutingError("two visual tokens claim the same sequence position")
    dst = owner_of[pos]
    dloc = local_of[pos]

    mine = src == me
    # Send order: by destination rank, then by the destination's local index; the receiver sorts the
    # same way per source, so both sides agree without exchanging indices.
    s_dst, s_dloc, s_row = dst[mine], dloc[mine], row[mine]
    order = torch.argsort(s_dst * (total + 1) + s_dloc)
    send_rows = s_row[order]
    send_counts = torch.bincount(s_dst, minlength=P).tolist()

    to_me = dst == me
    r_src, r_dloc = src[to_me], dloc[to_me]
    order = torch.argsort(r_src * (total + 1) + r_dloc)
    recv_local_index = r_dloc[order]
    recv_counts = torch.bincount(r_src, minlength=P).tolist()

    cross = src != dst
    cross_rows_sent = torch.bincount(src[cross], minlength=P).tolist()
    return RoutingPlan(cp_rank=me, cp_size=P, send_rows=send_rows, send_counts=send_counts,
                       recv_counts=recv_counts, recv_local_index=recv_local_index, local_rows=next_row[me],
                       total_rows=int(pos.numel()), cross_rows=int(cross.sum()), cross_rows_sent=cross_rows_sent)

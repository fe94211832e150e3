"""Stage 1 of MM-SP: which CP rank decodes and encodes each frame (or image) of a micro-batch; and the geometry of a
frame (patches, projector tokens) that the plan and the cost estimate need.

A pure function of the frames' estimated encoder costs and the number of CP ranks, so every rank computes
the same assignment from the same metadata without communicating.

Algorithm: LPT (longest processing time first) greedy. Frames are taken in decreasing cost (ties: original
order) and each goes to the least-loaded rank (ties: lowest rank). For F equal-cost frames on P ranks this
gives every rank floor(F/P) or ceil(F/P) frames, so max/mean load = ceil(F/P) / (F/P), the best possible.

LPT fixes only how many frames of each cost each rank gets. Which frame of a cost class goes where is then
free without changing any rank's load, and is chosen for the next stages:
- with `preferred` ranks (e.g. the rank that owns most of the frame's LLM tokens), frames go to their
  preferred rank while it has room for their cost class, which shrinks the stage-2 routing traffic;
- the remaining frames fill the remaining room in frame order, rank after rank, so a rank's frames of a
  video are consecutive where possible (cheaper decoding: fewer seeks).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import AssignmentError, ProjectorError, VisionConfigError

__all__ = ["FrameAssignment", "assign_frames", "encoder_cost", "patch_grid", "downsampled_grid", "tokens_per_frame",
           "AssignmentError"]


def patch_grid(height: int, width: int, patch_size: int) -> Tuple[int, int]:
    """(rows, cols) of patches of a frame. As in SigLIP, the patch convolution is "valid": pixels past the last
    whole patch are ignored (384 px -> 27 patches of 14 px)."""
    if height < patch_size or width < patch_size:
        raise VisionConfigError(f"frame of {height}x{width} px is smaller than one {patch_size} px patch")
    return height // patch_size, width // patch_size


def downsampled_grid(rows: int, cols: int) -> Tuple[int, int]:
    """Token grid after the projector's 2x2 space-to-channel (odd sides are padded up)."""
    return (rows + 1) // 2, (cols + 1) // 2


def tokens_per_frame(height: int, width: int, patch_size: int) -> int:
    """LLM tokens one frame of height x width px becomes (e.g. 196 at 384 px with 14 px patches)."""
    if height < patch_size or width < patch_size:
        raise ProjectorError(f"frame {height}x{width} px is smaller than one {patch_size} px patch")
    r, c = downsampled_grid(height // patch_size, width // patch_size)
    return r * c


@dataclass(frozen=True)
class FrameAssignment:
    """The stage-1 result for one micro-batch."""

    owner: List[int]
    """owner[f]: the CP rank that decodes and encodes frame f."""
    costs: List[float]
    """The per-frame encoder costs the assignment balanced."""
    num_ranks: int
    """P: the number of CP ranks."""

    def frames_of(self, rank: int) -> List[int]:
        """Frames a rank encodes, in increasing frame order (the order of its encoder batch)."""
        return [f for f, r in enumerate(self.owner) if r == rank]

    def loads(self) -> List[float]:
        """Total encoder cost per rank."""
        out = [0.0] * self.num_ranks
        for f, r in enumerate(self.owner):
            out[r] += self.costs[f]
        return out

    def imbalance(self) -> float:
        """max/mean encoder load over ranks (1.0 = perfect; 1.0 when there is no work at all)."""
        loads = self.loads()
        total = sum(loads)
        if total == 0:
            return 1.0
        return max(loads) / (total / self.num_ranks)


def encoder_cost(height: int, width: int, patch_size: int, layers: int = 1, hidden: int = 1) -> float:
    """Estimated encoder cost of one frame: a ViT layer costs ~ n * h^2 (MLP, projections) + n^2 * h
    (attention) for n patches; the constant factors cancel in a balance.

    Args:
        height, width: frame size in pixels (pixels past the last whole patch are not encoded).
        patch_size: ViT patch size.
        layers: encoder depth (scales every frame alike; kept for absolute estimates).
        hidden: encoder hidden size.
    """
    if height < patch_size or width < patch_size:
        raise AssignmentError(f"frame {height}x{width} px is smaller than one {patch_size} px patch")
    n = (height // patch_size) * (width // patch_size)
    return float(layers) * (12.0 * n * hidden * hidden + 2.0 * n * n * hidden)


def assign_frames(costs: Sequence[float], num_ranks: int, preferred: Optional[Sequence[Optional[int]]] = None
                  ) -> FrameAssignment:
    """Assign frames to CP ranks, balancing the encoder cost (LPT greedy, deterministic).

    Args:
        costs: estimated encoder cost per frame, in frame order (see `encoder_cost`); may be empty.
        num_ranks: P, the CP size. Ranks may receive no frame (3 frames on 8 ranks).
        preferred: optional preferred rank per frame (None: no preference). Used only to choose among
            frames of equal cost, so the per-rank loads, hence the imbalance, are those of plain LPT.

    Returns:
        FrameAssignment.
    """
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise AssignmentError(f"num_ranks must be a positive integer, got {num_ranks!r}")
    costs = [float(c) for c in costs]
    for f, c in enumerate(costs):
        if not c > 0 or c == float("inf"):
            raise AssignmentError(f"frame {f} has cost {c}: encoder costs must be finite and positive")
    if preferred is not None:
        if len(preferred) != len(costs):
            raise AssignmentError(f"preferred has {len(preferred)} entries for {len(costs)} frames")
        for f, p in enumerate(preferred):
            if p is not None and not (0 <= p < num_ranks):
                raise AssignmentError(f"preferred rank {p} of frame {f} is outside 0..{num_ranks - 1}")

    # LPT on cost classes: how many frames of each cost each rank gets.
    order = sorted(range(len(costs)), key=lambda f: (-costs[f], f))
    heap = [(0.0, r) for r in range(num_ranks)]
    room: Dict[float, List[int]] = {}
    for f in order:
        load, r = heapq.heappop(heap)
        room.setdefault(costs[f], [0] * num_ranks)[r] += 1
        heapq.heappush(heap, (load + costs[f], r))

    owner: List[Optional[int]] = [None] * len(costs)
    for c, counts in room.items():
        frames = [f for f in range(len(costs)) if costs[f] == c]
        if preferred is not None:
            for f in frames:
                p = preferred[f]
                if p is not None and counts[p] > 0:
                    owner[f] = p
                    counts[p] -= 1
        r = 0
        for f in frames:
            if owner[f] is not None:
                continue
            while counts[r] == 0:
                r += 1
            owner[f] = r
            counts[r] -= 1
    return FrameAssignment(owner=[int(o) for o in owner], costs=costs, num_ranks=num_ranks)

"""The MM-SP mesh: Ulysses x ring sub-groups inside Megatron-Core's context-parallel (CP) group.

A CP group of size U * R is arranged as a U x R mesh. Ulysses (all-to-all over heads) runs inside groups
of U ranks, which should share a fast domain (NVLink inside a node); the zigzag ring (P2P over sequence)
runs across the R Ulysses groups. By default the U ranks of a Ulysses group are consecutive CP ranks
(the usual intra-node placement); `ring_first=True` makes the ring ranks consecutive instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from ..errors import MeshError
from ..plan.sequence import coords_of, cp_rank_of
from . import comm
from .timeouts import group_timeout

__all__ = ["MMSPMesh", "build_mmsp_mesh", "single_rank_mesh", "validate_mesh_sizes", "cp_rank_of", "coords_of",
           "MeshError"]


@dataclass(frozen=True)
class MMSPMesh:
    """One rank's view of the U x R MM-SP mesh."""

    ulysses_group: Optional[dist.ProcessGroup]
    """Process group of the U ranks that exchange heads by all-to-all (None when U == 1)."""
    ring_group: Optional[dist.ProcessGroup]
    """Process group of the R ranks that pass KV blocks around the zigzag ring (None when R == 1)."""
    cp_group: Optional[dist.ProcessGroup]
    """The whole context-parallel group (U * R ranks)."""
    ulysses_size: int
    """U: number of ranks in a Ulysses group."""
    ring_size: int
    """R: number of ranks in a ring."""
    cp_rank: int
    """This rank's index in the CP group."""
    ulysses_rank: int
    """This rank's index in its Ulysses group (u)."""
    ring_rank: int
    """This rank's index in its ring (r)."""
    ring_first: bool = False
    """Whether ring ranks (rather than Ulysses ranks) are consecutive in the CP group."""

    @property
    def cp_size(self) -> int:
        return self.ulysses_size * self.ring_size

    def cp_rank_of(self, ring_rank: int, ulysses_rank: int) -> int:
        """CP-group index of mesh coordinate (r, u)."""
        return cp_rank_of(ring_rank, ulysses_rank, self.ulysses_size, self.ring_size, self.ring_first)

    def coords_of(self, cp_rank: int) -> Tuple[int, int]:
        """Mesh coordinate (r, u) of a CP-group index."""
        return coords_of(cp_rank, self.ulysses_size, self.ring_size, self.ring_first)


def validate_mesh_sizes(ulysses_size: int, ring_size: int, cp_size: int) -> None:
    """Raise MeshError with a message that says what to change."""
    for name, v in (("ulysses_size", ulysses_size), ("ring_size", ring_size)):
        if not isinstance(v, int) or v < 1:
            raise MeshError(f"{name} must be a positive integer, got {v!r}")
    if ulysses_size * ring_size != cp_size:
        raise MeshError(
            f"Ulysses size {ulysses_size} x ring size {ring_size} = {ulysses_size * ring_size} does not equal the "
            f"context-parallel size {cp_size}: set --hierarchical-context-parallel-sizes U R with U*R = "
            f"--context-parallel-size ({cp_size}).")


def _default_cp_group():
    # Megatron's parallel state can only be initialized if it was imported: avoid importing megatron.core
    # (seconds of start-up) just to find out it is not.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_context_parallel_group()
    return None


# Sub-groups built for the standalone API and the ring-first layout, keyed by (all CP groups' ranks, U, R,
# ring_first): new_group is collective over the world, so each layout's groups are created once, in the same
# order on every rank, and shared by every mesh of that layout (a process-wide resource, like Megatron's groups).
_CACHE: Dict[tuple, Dict[Tuple[int, ...], dist.ProcessGroup]] = {}


def _megatron_hierarchical_groups(cp_group, ulysses_size: int, ring_size: int, ring_first: bool):
    """Megatron's hierarchical CP groups as (Ulysses, ring) when they are exactly this mesh's, else None.

    `initialize_model_parallel(hierarchical_context_parallel_sizes=[U, R])` splits each CP group into groups of
    U consecutive CP ranks (level 0) and groups of R ranks with stride U (level 1): this mesh's Ulysses and ring
    groups in the default (Ulysses-first) layout. Reusing them costs no new communicators (each NCCL
    communicator holds GPU memory).
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if ring_first or parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return None
    if cp_group is not parallel_state.get_context_parallel_group(check_initialized=False):
        return None
    groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not groups or len(groups) != 2:
        return None
    if dist.get_world_size(groups[0]) != ulysses_size or dist.get_world_size(groups[1]) != ring_size:
        return None
    return groups[0], groups[1]


def build_mmsp_mesh(ulysses_size: int, ring_size: int, cp_group=None, *, ring_first: bool = False) -> MMSPMesh:
    """The U x R mesh of a CP group: Megatron's own hierarchical CP groups when they are this mesh, else new ones.

    Args:
        ulysses_size: U, ranks per Ulysses (all-to-all) group.
        ring_size: R, ranks per ring.
        cp_group: the CP group to split. None: Megatron's parallel_state CP group if initialized, else the
            default (world) group. Every rank of the world must call this (sub-group creation is collective
            over the world); ranks in different CP groups (TP, PP, DP replicas) each get their own sub-groups.
        ring_first: put the ring on consecutive CP ranks instead of Ulysses (always new groups: Megatron's
            hierarchical groups are Ulysses-first).
    """
    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialized: call init_process_group (or Megatron's "
                        "initialize_model_parallel) before build_mmsp_mesh")
    if cp_group is None:
        cp_group = _default_cp_group()
    if cp_group is None:
        cp_group = dist.group.WORLD
    cp_ranks = tuple(dist.get_process_group_ranks(cp_group))
    cp_size = len(cp_ranks)
    validate_mesh_sizes(ulysses_size, ring_size, cp_size)
    cp_rank = cp_ranks.index(dist.get_rank())
    r, u = coords_of(cp_rank, ulysses_size, ring_size, ring_first)
    megatron = _megatron_hierarchical_groups(cp_group, ulysses_size, ring_size, ring_first)
    if megatron is not None:
        ulysses_group = megatron[0] if ulysses_size > 1 else None
        ring_group = megatron[1] if ring_size > 1 else None
        return _mesh(ulysses_group, ring_group, cp_group, ulysses_size, ring_size, cp_rank, u, r, ring_first)

    # Learn every CP group of the world so all ranks create the same sub-groups in the same order.
    gathered: List[Optional[Tuple[int, ...]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, cp_ranks)
    all_cp = sorted(set(gathered))
    key = (tuple(all_cp), ulysses_size, ring_size, ring_first)
    if key not in _CACHE:
        groups: Dict[Tuple[int, ...], dist.ProcessGroup] = {}
        for ranks in all_cp:
            if len(ranks) != cp_size:
                raise MeshError(f"CP groups of different sizes in one world: {len(ranks)} vs {cp_size}")
            subsets = []
            if ulysses_size > 1:
                for rr in range(ring_size):
                    subsets.append(tuple(ranks[cp_rank_of(rr, uu, ulysses_size, ring_size, ring_first)]
                                         for uu in range(ulysses_size)))
            if ring_size > 1:
                for uu in range(ulysses_size):
                    subsets.append(tuple(ranks[cp_rank_of(rr, uu, ulysses_size, ring_size, ring_first)]
                                         for rr in range(ring_size)))
            for s in subsets:
                groups[s] = dist.new_group(list(s), timeout=group_timeout())
        _CACHE[key] = groups
    groups = _CACHE[key]
    me_u = tuple(cp_ranks[cp_rank_of(r, uu, ulysses_size, ring_size, ring_first)] for uu in range(ulysses_size))
    me_r = tuple(cp_ranks[cp_rank_of(rr, u, ulysses_size, ring_size, ring_first)] for rr in range(ring_size))
    ulysses_group = groups[me_u] if ulysses_size > 1 else None
    ring_group = groups[me_r] if ring_size > 1 else None
    return _mesh(ulysses_group, ring_group, cp_group, ulysses_size, ring_size, cp_rank, u, r, ring_first)


def _mesh(ulysses_group, ring_group, cp_group, ulysses_size, ring_size, cp_rank, u, r, ring_first) -> MMSPMesh:
    if ulysses_group is not None:
        comm.register_group(ulysses_group, "ulysses")
    if ring_group is not None:
        comm.register_group(ring_group, "ring")
    comm.register_group(cp_group, "cp")
    return MMSPMesh(ulysses_group=ulysses_group, ring_group=ring_group, cp_group=cp_group,
                    ulysses_size=ulysses_size, ring_size=ring_size, cp_rank=cp_rank,
                    ulysses_rank=u, ring_rank=r, ring_first=ring_first)


def single_rank_mesh() -> MMSPMesh:
    """A 1x1 mesh that needs no process group (single-process reference and CP=1 runs)."""
    return MMSPMesh(ulysses_group=None, ring_group=None, cp_group=None, ulysses_size=1, ring_size=1,
                    cp_rank=0, ulysses_rank=0, ring_rank=0)

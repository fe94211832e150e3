"""Host (gloo) process groups for metadata: planning agreement, decode failures, step totals, checkpoint flags.

    host_group_of(group, *, separate=False) -> ProcessGroup | None
    host_group_by(key, *, tag) -> (ProcessGroup | None, ranks)   the ranks whose key equals this rank's

Metadata lives on the host; exchanging it on an NCCL group would copy it to the device and synchronize. A gloo
group with the same ranks does it on the host. Creating a group is collective over the world (every rank calls
new_group for every group, in the same order), so the first call for one group creates the groups of all its peers
(learned by one all-gather) and later calls look them up.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .timeouts import group_timeout

__all__ = ["host_group_of", "host_group_by"]

_HOST_GROUPS: Dict[tuple, dist.ProcessGroup] = {}


def host_group_of(group, *, separate: bool = False) -> Optional[dist.ProcessGroup]:
    """A gloo group with the same ranks as `group`, made once per set of peer groups; None for None.

    Args:
        group: the group to mirror (dist.group.WORLD for every rank).
        separate: always a group of its own, even when `group` is gloo already: collectives there never pair with
            a collective someone else left half-done on `group` (the checkpoint agreement uses it, since
            megatron-core's writer may leave one on the default group when a rank fails mid-save).
    """
    if group is None:
        return None
    if not separate and dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    # Keyed by the default group too: a process that re-initializes torch.distributed (tests) gets new groups.
    world = id(c10d._get_default_group())
    key = (world, separate, ranks)
    if key not in _HOST_GROUPS:
        if len(ranks) == dist.get_world_size():
            peers = [ranks]  # the whole world has no peer groups: nothing to learn (and no collective on `group`)
        else:
            gathered: List[Optional[Tuple[int, ...]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, ranks)
            peers = sorted(set(gathered))
        for peer in peers:
            peer_key = (world, separate, peer)
            if peer_key not in _HOST_GROUPS:
                _HOST_GROUPS[peer_key] = dist.new_group(list(peer), backend="gloo", timeout=group_timeout())
    return _HOST_GROUPS[key]


def host_group_by(key, *, tag: str) -> Tuple[Optional[dist.ProcessGroup], Tuple[int, ...]]:
    """A gloo group of the ranks whose `key` (any picklable value, e.g. the data-parallel rank: a model-parallel
    replica) equals this rank's, and those ranks in order. Collective over the world: every rank calls it with its
    own key and the same `tag`; each tag gets groups of its own, so the threads that use different tags never pair
    their collectives. The group is None for a single rank (nothing to exchange)."""
    gathered: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (tag, key))
    if any(t != tag for t, _ in gathered):
        raise RuntimeError(f"host_group_by: ranks called it with different tags ({sorted({t for t, _ in gathered})})")
    members: Dict[object, List[int]] = {}
    for rank, (_, k) in enumerate(gathered):
        members.setdefault(repr(k), []).append(rank)
    world = id(c10d._get_default_group())
    mine = tuple(members[repr(key)])
    for ranks in sorted(tuple(r) for r in members.values()):  # the same order on every rank
        group_key = (world, "by:" + tag, ranks)
        if group_key not in _HOST_GROUPS and len(ranks) > 1:
            _HOST_GROUPS[group_key] = dist.new_group(list(ranks), backend="gloo", timeout=group_timeout())
    return (_HOST_GROUPS[(world, "by:" + tag, mine)] if len(mine) > 1 else None), mine

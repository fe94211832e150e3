"""Which ranks share a node, checked at start-up: TP and Ulysses groups must each lie inside one node (NVLink).

    node_name() -> str                      this process's node: Slurm's SLURMD_NODENAME, else the host name
    check_groups(nodes, groups) -> list     the groups that span nodes (pure: tests give it any layout)
    check_node_placement(args=None) -> dict gather every rank's node, check this run's actual Megatron groups,
                                            raise PlacementError naming the flag to change; rank 0 prints the map

Megatron lays ranks out in a fixed order (TP fastest, then CP with the Ulysses level inner) and a launcher puts
consecutive ranks on a node; whether that holds is not assumed: the groups are read from megatron.core's
parallel_state and compared with the nodes the ranks report.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Sequence

import torch.distributed as dist

from ..errors import PlacementError

__all__ = ["PlacementError", "node_name", "check_groups", "check_node_placement"]


def node_name() -> str:
    """The node this process runs on (Slurm's name for it when launched by srun)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_groups(nodes: Sequence[str], groups: Dict[str, Sequence[Sequence[int]]]) -> List[str]:
    """Descriptions of the groups (by kind) whose global ranks are not all on one node."""
    bad = []
    for kind, members in groups.items():
        for ranks in members:
            where = sorted({nodes[r] for r in ranks})
            if len(where) > 1:
                bad.append(f"{kind} group of ranks {list(ranks)} spans nodes {where}")
    return bad


def _all_groups(group) -> List[List[int]]:
    """Every group of a kind, from this rank's own group gathered over the world (each rank knows only its own)."""
    mine = dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [list(x) for x in {tuple(g) for g in everyone}]


def check_node_placement(args=None) -> dict:
    """Check this run's TP and Ulysses groups against the ranks' nodes (collective: every rank calls it after
    Megatron's parallel state exists). Returns {"nodes": {node: [ranks]}, "groups": {...}}."""
    from megatron.core import parallel_state as ps

    nodes: List = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node_name())
    groups = {"tensor-parallel": _all_groups(ps.get_tensor_model_parallel_group())}
    hier = None
    try:
        hier = ps.get_hierarchical_context_parallel_groups(check_initialized=False)
    except Exception:  # megatron-core without the accessor
        hier = None
    if hier:
        groups["Ulysses"] = _all_groups(hier[0])
    by_node: Dict[str, List[int]] = {}
    for r, n in enumerate(nodes):
        by_node.setdefault(n, []).append(r)
    bad = check_groups(nodes, groups)
    if bad:
        per_node = min(len(v) for v in by_node.values())
        raise PlacementError(
            "; ".join(bad) + f": TP and Ulysses need NVLink inside a node ({per_node} ranks per node here); make "
            f"--tensor-model-parallel-size x U of --hierarchical-context-parallel-sizes U R divide the ranks per node "
            f"and launch node-contiguous ranks (torchrun --nproc-per-node = GPUs per node)")
    report = {"nodes": by_node, "groups": groups}
    if dist.get_rank() == 0:
        text = ", ".join(f"{n}: ranks {v}" for n, v in sorted(by_node.items()))
        uly = groups.get("Ulysses")
        print(f"LongVILA node placement: {text}; Ulysses groups {sorted(uly) if uly else 'none'} each inside one node",
              flush=True)
    return report

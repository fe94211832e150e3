"""Mesh construction on gloo ranks, and plan.shard / plan.gather as exact inverses with autograd."""

import pytest
import torch

from megatron_longvila.errors import MeshError
from megatron_longvila.parallel.mesh import validate_mesh_sizes
from megatron_longvila.parallel.launch import run_distributed


def _mesh_worker(rank, world):
    import torch.distributed as dist

    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    out = {}
    for U, R, rf in ((2, 2, False), (2, 2, True), (4, 1, False), (1, 4, False)):
        m = build_mmsp_mesh(U, R, ring_first=rf)
        out[(U, R, rf)] = (
            dist.get_process_group_ranks(m.ulysses_group) if m.ulysses_group else None,
            dist.get_process_group_ranks(m.ring_group) if m.ring_group else None,
            m.cp_rank, m.cp_size,
        )
    # Two CP groups of 2 in a world of 4 (as with DP=2): each gets its own sub-groups.
    cps = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cp = cps[rank // 2]
    m = build_mmsp_mesh(2, 1, cp_group=cp)
    out["dp2"] = dist.get_process_group_ranks(m.ulysses_group)
    # cp_group=None inside Megatron: the mesh splits Megatron's CP group (here CP 2 x DP 2).
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=2, hierarchical_context_parallel_sizes=[2, 1])
    m = build_mmsp_mesh(2, 1)
    out["megatron_cp"] = (dist.get_process_group_ranks(m.ulysses_group),
                          dist.get_process_group_ranks(ps.get_context_parallel_group()))
    ps.destroy_model_parallel()
    # shard/gather round trip with autograd, on a uniform (padded) plan
    mesh = build_mmsp_mesh(2, 2)
    plan = plan_sequence(mesh, [13, 1, 6], uniform=True, pad_to_multiple=2)
    x = torch.arange(20 * 3, dtype=torch.float64).view(20, 3)
    xl = plan.shard(x, seq_dim=0).requires_grad_()
    full = plan.gather(xl, seq_dim=0)
    w = torch.linspace(0, 1, 60, dtype=torch.float64).view(20, 3)
    (full * w).sum().backward()
    out["roundtrip"] = torch.equal(full, x)
    out["grad"] = torch.equal(xl.grad, plan.shard(w))
    y = plan.gather(plan.shard(x.t(), seq_dim=1), seq_dim=1)
    out["roundtrip_dim1"] = torch.equal(y, x.t())
    return out


def test_mesh_groups_and_gather():
    res = run_distributed(_mesh_worker, 4)
    for rank, o in enumerate(res):
        assert o[(2, 2, False)] == ([rank // 2 * 2, rank // 2 * 2 + 1], [rank % 2, rank % 2 + 2], rank, 4)
        assert o[(2, 2, True)] == ([rank % 2, rank % 2 + 2], [rank // 2 * 2, rank // 2 * 2 + 1], rank, 4)
        assert o[(4, 1, False)][:2] == ([0, 1, 2, 3], None)
        assert o[(1, 4, False)][:2] == (None, [0, 1, 2, 3])
        assert o["dp2"] == ([0, 1] if rank < 2 else [2, 3])
        assert o["megatron_cp"][0] == o["megatron_cp"][1] and len(o["megatron_cp"][0]) == 2
        assert o["roundtrip"] and o["grad"] and o["roundtrip_dim1"]


@pytest.mark.parametrize("U,R,cp", [(2, 2, 8), (3, 1, 4), (0, 4, 0)])
def test_invalid_mesh_sizes(U, R, cp):
    with pytest.raises(MeshError, match="must|does not equal"):
        validate_mesh_sizes(U, R, cp)

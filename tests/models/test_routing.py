"""Stage-2 routing on gloo: exact placement, gradients back to the encoding rank, bytes = minimum.

`check_routing(mesh, tag)` runs inside the 8-rank world of test_longvila_mmsp.py (one spawn for both: each
8-rank spawn costs seconds on CI's two cores); `test_routing_exact_and_minimal` below runs it on its own.
"""

import torch
import torch.distributed as dist

from megatron_longvila.parallel import comm
from megatron_longvila.plan.frames import assign_frames
from megatron_longvila.parallel.mesh import build_mmsp_mesh
from megatron_longvila.plan.routing import build_routing_plan
from megatron_longvila.parallel.routing import merge_visual, route
from megatron_longvila.parallel.sharding import plan_sequence

H = 8


def _scenarios():
    # (document lengths, per-frame (document, first token, tokens)) -- frames of a video, an image, text-only docs
    yield [40, 9, 23], [(0, 3 + 5 * i, 4) for i in range(7)] + [(2, 2, 9)]  # 7 video frames + 1 image
    yield [13, 30], [(1, 1, 4), (1, 6, 4), (1, 11, 4)]  # 3 frames (fewer than 8 ranks)
    yield [11], []  # text only


def check_routing(mesh, tag):
    out = []
    P = mesh.cp_size
    for s, (lens, frames) in enumerate(_scenarios()):
        plan = plan_sequence(mesh, lens)
        starts = [sum(lens[:d]) for d in range(len(lens))]
        positions = [torch.arange(starts[d] + t0, starts[d] + t0 + n) for d, t0, n in frames]
        g = torch.Generator().manual_seed(100 + s)
        full_rows = [torch.randn(n, H, generator=g, dtype=torch.float64) for _, _, n in frames]
        weight = torch.randn(plan.total_len, H, generator=g, dtype=torch.float64)
        assign = assign_frames([float(n) for _, _, n in frames], P)
        rp = build_routing_plan(assign.owner, positions, plan)
        mine = assign.frames_of(mesh.cp_rank)
        local = (torch.cat([full_rows[f] for f in mine]) if mine else torch.zeros(0, H, dtype=torch.float64))
        local = local.clone().requires_grad_(True)
        comm.reset_counters()
        got = merge_visual(torch.zeros(plan.local_len, 1, H, dtype=torch.float64),
                           route(local, rp, mesh.cp_group), rp)
        fwd = comm.counters()["bytes"].get("cp/mmsp_route", 0)
        # Expected: the full sequence with visual rows at their positions, sharded by the plan.
        full = torch.zeros(plan.total_len, H, dtype=torch.float64)
        for p, r in zip(positions, full_rows):
            full[p] = r
        assert torch.equal(got[:, 0], plan.shard(full)), (tag, s)
        (got[:, 0] * plan.shard(weight)).sum().backward()
        bwd = comm.counters()["bytes"].get("cp/mmsp_route_bwd", 0)
        exp_grad = torch.cat([weight[positions[f]] for f in mine]) if mine else torch.zeros(0, H, dtype=torch.float64)
        assert torch.equal(local.grad, exp_grad), (tag, s)
        # Independent minimum: rows of my frames whose token owner is another rank.
        owner = torch.full((plan.total_len,), -1, dtype=torch.long)
        for r in range(P):
            owner[plan.token_index(r)] = r
        my_cross = sum(int((owner[positions[f]] != mesh.cp_rank).sum()) for f in mine)
        into_me = sum(int(((owner[positions[f]] == mesh.cp_rank)).sum())
                      for f in range(len(frames)) if assign.owner[f] != mesh.cp_rank)
        assert fwd == my_cross * H * 8 == rp.bytes_sent(H, 8), (tag, s, fwd, my_cross)
        assert bwd == into_me * H * 8 == rp.bytes_received(H, 8), (tag, s, bwd, into_me)
        out.append((tag, s, fwd, rp.min_bytes_total(H, 8)))
    return out


def _worker(rank, world):
    groups4 = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    groups2 = [dist.new_group([2 * i, 2 * i + 1]) for i in range(4)]
    results = []
    for U, R in [(2, 4), (4, 2)]:
        results += check_routing(build_mmsp_mesh(U, R), f"{U}x{R}")
    results += check_routing(build_mmsp_mesh(2, 2, groups4[rank // 4]), "2x2")
    for U, R in [(2, 1), (1, 2)]:
        results += check_routing(build_mmsp_mesh(U, R, groups2[rank // 2]), f"{U}x{R}")
    return results


def check_group_minimum(res):
    # Per group, the bytes sent by its ranks add up to the group's minimum.
    for i in range(len(res[0])):
        tag, s, _, mn = res[0][i]
        size = {"2x4": 8, "4x2": 8, "2x2": 4, "2x1": 2, "1x2": 2}[tag]
        assert sum(res[r][i][2] for r in range(size)) == mn, (tag, s)


def test_routing_exact_and_minimal():
    from .test_longvila_mmsp import shared_world

    check_group_minimum([r["routing"] for r in shared_world()])

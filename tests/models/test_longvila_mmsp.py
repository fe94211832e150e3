"""LongVILA with two-stage MM-SP on gloo equals the CP=1 model: loss and every gradient (vision encoder,
projector, LLM), fp32, relative tolerance 1e-5 (max abs error <= 1e-5 * max |reference| per tensor).

Meshes U x R: 2x1, 1x2, 2x2, 2x4, 4x2 at TP=1, and 2x2 and 1x2 at TP=2, all in one 8-rank world (smaller
CP groups run as data-parallel replicas). Micro-batches mix a video, an image and a text-only sample, with
7 frames (not a multiple of 2, 4 or 8) and 3 frames (fewer than 8 ranks: some ranks encode nothing).
Also: stage-1 imbalance meets ceil(F/P)/(F/P) for equal-cost frames, stage-2 bytes equal the minimum
forward and backward, and a frozen encoder (alignment stage) still routes the projector's gradients.
"""

import math

import torch
import torch.distributed as dist

from megatron_longvila.models.freezing import apply_freezing
from megatron_longvila.parallel import comm
from megatron_longvila.parallel.mesh import build_mmsp_mesh, single_rank_mesh
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.runtime.modules import model_device
from megatron_longvila.batch.microbatch import plan_microbatch

from ._longvila_cases import build, load_from, micro_batch, setup_megatron, tp_slice
from .test_routing import _worker as routing_worker

RTOL = 1e-5
CASES = ("seven", "three")
MESHES = [(1, 2, 1), (1, 1, 2), (1, 2, 2), (1, 2, 4), (1, 4, 2), (2, 2, 2), (2, 1, 2)]  # (TP, U, R)


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _close(got, ref):
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((got - ref).abs().max()) <= RTOL * max(scale, 1e-30) if got.numel() else True


def _worker(rank, world):
    routing = routing_worker(rank, world)
    return {"routing": routing, "model": _model_worker(rank, world)}


def _model_worker(rank, world):
    from megatron.core import parallel_state as ps

    # Reference: the same model at TP=1, CP=1, in this process.
    setup_megatron()
    ref_model = build()
    ref_state = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref = {}
    for case in CASES:
        ref_model.zero_grad(set_to_none=True)
        loss = ref_model(micro_batch(case), single_rank_mesh())
        loss.backward()
        ref[case] = (loss.detach(), _grads(ref_model))

    report = []
    for tp, U, R in MESHES:
        cp = U * R
        setup_megatron(tp=tp, cp=cp, hier=[U, R])
        mesh = build_mmsp_mesh(U, R)
        model = build(tp, cp, [U, R])
        tp_rank = ps.get_tensor_model_parallel_rank()
        load_from(model, ref_state, tp, tp_rank)
        for case in CASES:
            model.zero_grad(set_to_none=True)
            comm.reset_counters()
            mb = micro_batch(case)
            step = plan_microbatch(model.visual_spec, mb, mesh).to(model_device(model))
            loss = model(step)
            fwd_bytes = comm.counters()["bytes"].get("cp/mmsp_route", 0)
            loss.backward()
            bwd_bytes = comm.counters()["bytes"].get("cp/mmsp_route_bwd", 0)
            total = loss.detach().clone()
            dist.all_reduce(total, group=mesh.cp_group)
            ref_loss, ref_grads = ref[case]
            assert _close(total, ref_loss), (tp, U, R, case, float(total), float(ref_loss))
            bad = []
            for n, p in model.named_parameters():
                g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g, group=mesh.cp_group)  # what DDP's reduction over CP does
                if not _close(g, tp_slice(n, p, ref_grads[n], tp, tp_rank)):
                    bad.append(n)
            assert not bad, (tp, U, R, case, bad)
            a, rp = step.assignment, step.routing
            F = len(mb.frames)
            if len(set(a.costs)) == 1:  # equal-cost frames: the ceil bound
                assert a.imbalance() <= math.ceil(F / cp) / (F / cp) + 1e-12, (tp, U, R, case, a.owner)
            hidden = model.language_model.hidden_size
            assert fwd_bytes == rp.bytes_sent(hidden, 4), (tp, U, R, case)
            assert bwd_bytes == rp.bytes_received(hidden, 4), (tp, U, R, case)
            report.append(dict(tp=tp, U=U, R=R, case=case, frames=F, encoded=len(step.frames_encoded),
                               imbalance=a.imbalance(), fwd=fwd_bytes, bwd=bwd_bytes,
                               min_total=rp.min_bytes_total(hidden, 4), cp_rank=mesh.cp_rank,
                               cp_group=tuple(dist.get_process_group_ranks(mesh.cp_group))))

    # Alignment stage (only the projector trains) on the widest mesh: the projector's gradient still comes
    # back from the token owners, and frozen parts get none.
    setup_megatron(tp=1, cp=8, hier=[2, 4])
    mesh = build_mmsp_mesh(2, 4)
    model = build(1, 8, [2, 4])
    load_from(model, ref_state, 1, 0)
    apply_freezing(model, "align")
    loss = model(micro_batch("three"), mesh)
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("projector."):
            g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g, group=mesh.cp_group)
            assert _close(g, ref["three"][1][n]), n
        else:
            assert p.grad is None, n
    ps.destroy_model_parallel()
    return report


_SHARED = []


def shared_world():
    """One 8-rank run serving this module's test and test_routing's (spawned once per session)."""
    if not _SHARED:
        _SHARED.append(run_distributed(_worker, 8, timeout=600))
    return _SHARED[0]


def test_longvila_mmsp_matches_cp1():
    reports = [r["model"] for r in shared_world()]
    # Stage-2 bytes: the ranks of each CP group together move exactly the minimum, forward and backward.
    seen = set()
    for r in reports[0]:
        key = (r["tp"], r["U"], r["R"], r["case"])
        rows = [x for rep in reports for x in rep if (x["tp"], x["U"], x["R"], x["case"]) == key
                and x["cp_group"] == r["cp_group"]]
        assert len(rows) == r["U"] * r["R"]
        assert sum(x["fwd"] for x in rows) == r["min_total"], key
        assert sum(x["bwd"] for x in rows) == r["min_total"], key
        assert sum(x["encoded"] for x in rows) == r["frames"], key  # every frame encoded exactly once
        seen.add(key)
    assert len(seen) == len(MESHES) * len(CASES)
    # 3 frames on 8 ranks: five ranks encode nothing and still took part.
    idle = [x for rep in reports for x in rep if (x["U"], x["R"], x["case"]) == (2, 4, "three") and x["encoded"] == 0]
    assert len(idle) == 5

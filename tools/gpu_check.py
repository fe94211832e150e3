#!/usr/bin/env python3
"""GPU checks of the attention kernels and the zigzag block schedule (run on a CUDA machine).

1. Exactness: the `torch_cuda` backend (and `te`, `te_fp8` when Transformer Engine imports) against the
   `math` backend in float32 on random varlen segments (causal and full, GQA), forward and backward.
2. `mmsp_attention` on a 1x1 mesh with the CUDA kernel against PyTorch's attention, per document, and on
   2x2, 1x4 and 4x1 meshes of ranks sharing the GPU (gloo, host-staged collectives).
3. Speed: one ring rank's zigzag block schedule (R steps of per-document blocks merged by log-sum-exp, no
   communication) against a single fused causal call over the whole sequence, normalized per
   query-key pair: efficiency = (pairs/s of the schedule) / (pairs/s of the fused call).

  python tools/gpu_check.py --json > gpu_check.json
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_kernels(names, device):
    from megatron_longvila.errors import BackendUnavailable
    from megatron_longvila.plan.segments import Segments
    from megatron_longvila.attention.backends import get_backend

    g = torch.Generator(device="cpu").manual_seed(0)
    results = []
    for causal, cu_q, cu_k in ((True, [0, 1, 130, 1154, 1161], [0, 1, 130, 1154, 1161]),
                               (False, [0, 64, 600], [0, 300, 321])):
        seg = Segments(cu_q, cu_k, causal)
        q = torch.randn(cu_q[-1], 8, 128, generator=g).to(device)
        k = torch.randn(cu_k[-1], 2, 128, generator=g).to(device)
        v = torch.randn(cu_k[-1], 2, 128, generator=g).to(device)
        do = torch.randn(q.shape, generator=g).to(device)
        ref = get_backend("math", q)
        ro, rl = ref.forward(q, k, v, seg, 0.088)
        rg = ref.backward(do, q, k, v, ro, rl, seg, 0.088)
        for name in names:
            try:
                be = get_backend(name, q.bfloat16())
            except BackendUnavailable as e:
                results.append({"backend": name, "causal": causal, "skipped": str(e)})
                continue
            qb, kb, vb, dob = (t.bfloat16() for t in (q, k, v, do))
            o, l = be.forward(qb, kb, vb, seg, 0.088)
            gr = be.backward(dob, qb, kb, vb, o, l, seg, 0.088)
            results.append({"backend": name, "causal": causal, "out": _rel(o, ro), "lse": _rel(l, rl),
                            "dq": _rel(gr[0], rg[0]), "dk": _rel(gr[1], rg[1]), "dv": _rel(gr[2], rg[2])})
    return results


def check_mmsp_single(device, backend):
    from megatron_longvila.attention import mmsp_attention, reference_attention
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.parallel.sharding import plan_sequence

    lens = [1, 777, 2048, 13]
    plan = plan_sequence(single_rank_mesh(), lens)
    g = torch.Generator(device="cpu").manual_seed(1)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, 2, h, 128, generator=g).to(device) for h in (8, 2, 2, 8))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = mmsp_attention(qb, kb, vb, plan, backend=backend)
    out.backward(do.bfloat16())
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, lens)
    ref.backward(do.double())
    return {"backend": backend, "out": _rel(out, ref), "dq": _rel(qb.grad, qr.grad),
            "dk": _rel(kb.grad, kr.grad), "dv": _rel(vb.grad, vr.grad)}


def check_mmsp_mesh(backend, U, R):
    """U x R ranks sharing GPU 0 (gloo, host-staged collectives), bf16, against float64 attention."""
    from megatron_longvila.attention.check import AttentionCheckConfig, run_attention_check

    cfg = AttentionCheckConfig(ulysses=U, ring=R, seq_lens=[1, 1000, 37, 4], heads=8, kv_heads=2, head_dim=128,
                               dtype="bfloat16", backend=backend, device="cuda", iters=1)
    res = run_attention_check(cfg)
    return {"backend": backend, "mesh": f"{U}x{R}", "rel_err": res["rel_err"], "comm_ratio": res["comm_ratio"],
            "flops_imbalance": res["flops_imbalance"]}


def _time(fn, iters):
    """Median seconds of fn: CUDA events on a GPU, the wall clock on a CPU (dry runs of the scripts)."""
    for _ in range(2):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


def bench_schedule(device, backend, T, R, heads, kv_heads, d, iters, rank):
    """One ring rank's zigzag schedule (all KV buffers local) vs one fused causal call on all T tokens."""
    from megatron_longvila.plan.segments import Segments
    from megatron_longvila.attention.backends import get_backend
    from megatron_longvila.attention.ring import _merge, _take
    from megatron_longvila.plan.ring import ring_step_block
    from megatron_longvila.parallel.mesh import MMSPMesh
    from megatron_longvila.parallel.sharding import plan_sequence

    mesh = MMSPMesh(None, None, None, 1, R, rank, 0, rank)
    plan = plan_sequence(mesh, [T])
    q = torch.randn(T, heads, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(T, kv_heads, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(T, kv_heads, d, device=device, dtype=torch.bfloat16)
    be = get_backend(backend, q)
    scale = d ** -0.5
    qr = q.index_select(0, plan.ring_index[rank].to(device))
    kvs = [(k.index_select(0, plan.ring_index[j].to(device)), v.index_select(0, plan.ring_index[j].to(device)))
           for j in range(R)]
    blocks = [ring_step_block(plan, rank, (rank - s) % R, True) for s in range(R)]
    plan.to(device)  # the blocks' index tensors and segment offsets on the GPU before timing
    pairs_sched = sum(b.seg.pairs() for b in blocks)

    def schedule():
        out = torch.zeros(qr.shape, dtype=torch.float32, device=device)
        lse = torch.full((heads, qr.shape[0]), float("-inf"), dtype=torch.float32, device=device)
        for s, blk in enumerate(blocks):
            kk, vv = kvs[(rank - s) % R]
            q_rows, k_rows = blk.rows_on(device)
            o, l = be.forward(_take(qr, q_rows), _take(kk, k_rows), _take(vv, k_rows), blk.seg, scale)
            _merge(out, lse, o, l, q_rows)
        return out

    full_seg = Segments([0, T], [0, T], True)

    def fused():
        return be.forward(q, k, v, full_seg, scale)

    t_sched = _time(schedule, iters)
    t_full = _time(fused, iters)
    pairs_full = full_seg.pairs()
    eff = (pairs_sched / t_sched) / (pairs_full / t_full)
    flops = 4 * d * heads
    return {"T": T, "R": R, "rank": rank, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
            "backend": be.name, "schedule_s": t_sched, "fused_causal_s": t_full,
            "schedule_tflops": flops * pairs_sched / t_sched / 1e12,
            "fused_tflops": flops * pairs_full / t_full / 1e12, "efficiency": eff}


def _init(device: str) -> None:
    """Nothing to set up: each check builds its own process group or none."""


def _max_err(rows, keys=("out", "lse", "dq", "dk", "dv")) -> float:
    return max(r[k] for r in rows for k in keys if k in r)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dry-run", action="store_true",
                   help="check the tool's plumbing on a CPU: every section needs CUDA and says so")
    p.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--rings", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args(argv)
    from gpu_sections import Goal, Section, emit, run_sections
    from megatron_longvila.runtime.probes import te_available

    dev = torch.device("cuda")
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "te_available": te_available()}
    names = ["torch_cuda"] + (["te", "te_fp8"] if res["te_available"] else [])

    def schedule():
        return [bench_schedule(dev, n, T, R, 32, 8, 128, a.iters, rank)
                for n in names[:2] for T in a.seq for R in a.rings for rank in (0, R - 1)]

    def kernels_ok(rows):
        done = [r for r in rows if "skipped" not in r]
        bf16 = [r for r in done if r["backend"] != "te_fp8"]
        fp8 = [r for r in done if r["backend"] == "te_fp8"]
        ok = (not bf16 or _max_err(bf16) <= 2e-2) and (not fp8 or _max_err(fp8) <= 0.1)
        return ok, (f"bf16 max {_max_err(bf16):.2e}" if bf16 else "no bf16 kernel") + \
            (f", fp8 max {_max_err(fp8):.2e}" if fp8 else "")

    sections = {
        "kernels": Section(lambda: check_kernels(names, dev), goal=Goal(
            "each kernel within 2e-2 (bf16; 0.1 FP8) relative L2 of the fp32 math kernel", kernels_ok)),
        "mmsp_1x1": Section(lambda: [check_mmsp_single(dev, n) for n in names if n != "te_fp8"], goal=Goal(
            "mmsp_attention on one rank within 2e-2 of float64 attention",
            lambda rows: (_max_err(rows, ("out", "dq", "dk", "dv")) <= 2e-2,
                          f"max {_max_err(rows, ('out', 'dq', 'dk', 'dv')):.2e}"))),
        "mmsp_mesh": Section(lambda: [check_mmsp_mesh(n, U, R) for n in names if n != "te_fp8"
                                      for U, R in ((2, 2), (1, 4), (4, 1))], goal=Goal(
            "2x2, 1x4 and 4x1 meshes within 2e-2 of float64 attention",
            lambda rows: (max(max(r["rel_err"].values()) for r in rows) <= 2e-2,
                          f"max {max(max(r['rel_err'].values()) for r in rows):.2e}"))),
        "schedule": Section(schedule, goal=Goal(
            "ring schedule efficiency >= 0.95 (pairs/s against one fused causal call)",
            lambda rows: (min(r["efficiency"] for r in rows) >= 0.95,
                          f"min {min(r['efficiency'] for r in rows):.3f} over {len(rows)}"))),
    }
    status = run_sections("gpu_check", sections, list(sections), a.dry_run, res, _init)
    if status != 2:
        emit(res, a.json)
    return status

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Activation memory of real LongVILA steps on CPU ranks, measured, next to the memory model's prediction.

Every recompute/offload setting x every mesh (1x1; 2x2; 2x2 with PP=2) x two shapes, vision encoder included
(megatron_longvila.planning.bench). Measured on each rank, independently of the model: the distinct bytes autograd
saves for the backward in one micro-batch's forward (saved-tensor hooks), the peak of live tensor storage during
the step's forward and backward (a dispatch-mode tracker), the bytes activation offload moved to host memory, and
RSS beside them. Predicted: planning.memory for the same shapes and each rank's own tokens and frames.

    python tools/bench_memory.py --json                       # the whole matrix (about a minute on 2 cores)
    python tools/bench_memory.py --shapes tiny --meshes 2x2   # a part of it

Exit status 1 when any figure is off by more than --tolerance (default 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def summarize(rows, tolerance: float) -> dict:
    """One entry per (shape, mesh, setting): the worst rank's relative errors and the figures of that rank."""
    from megatron_longvila.planning.bench import relative_error

    cases = {}
    for r in rows:
        key = (r["shape"], r["mesh_name"], r["setting"])
        c = cases.setdefault(key, {"shape": r["shape"], "mesh": r["mesh_name"], "setting": r["setting"], "ranks": 0,
                                   "worst": {}, "figures": {}})
        c["ranks"] += 1
        for fig in ("saved", "peak", "offloaded"):
            err = relative_error(r, fig)
            if err is None:
                continue
            if fig not in c["worst"] or abs(err) > abs(c["worst"][fig]):
                c["worst"][fig] = err
                c["figures"][fig] = {"measured": r["measured"][fig], "predicted": r["predicted"][fig],
                                     "rank": r["rank"], "stage": r["stage"]}
        c.setdefault("rss_mb", 0)
        c["rss_mb"] = max(c["rss_mb"], r["measured"]["rss"] / 2 ** 20)
    out = list(cases.values())
    worst = max((abs(v) for c in out for v in c["worst"].values()), default=0.0)
    return {"cases": out, "worst_relative_error": worst, "within_tolerance": worst <= tolerance,
            "tolerance": tolerance}


def main(argv=None) -> int:
    from megatron_longvila.planning.bench import BENCH_MESHES, BENCH_SETTINGS, BENCH_SHAPES, MICRO

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--shapes", default=",".join(BENCH_SHAPES), help=f"of {sorted(BENCH_SHAPES)}")
    p.add_argument("--settings", default=",".join(BENCH_SETTINGS), help=f"of {sorted(BENCH_SETTINGS)}")
    p.add_argument("--meshes", default=",".join(BENCH_MESHES), help=f"of {sorted(BENCH_MESHES)}")
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative error accepted")
    p.add_argument("--rows", action="store_true", help="include every rank's row in the JSON")
    a = p.parse_args(argv)
    pick = {}
    for name, table in (("shapes", BENCH_SHAPES), ("settings", BENCH_SETTINGS), ("meshes", BENCH_MESHES)):
        got = [x for x in getattr(a, name).split(",") if x]
        bad = sorted(set(got) - set(table))
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {sorted(table)}")
        pick[name] = got
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from megatron_longvila.planning.bench import run_matrix

    t0 = time.perf_counter()
    rows = run_matrix(pick["shapes"], pick["settings"], pick["meshes"])
    res = summarize(rows, a.tolerance)
    res.update(date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - t0, micro_batches=MICRO,
               machine=f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
               shapes={k: {"llm": BENCH_SHAPES[k].llm, "vision": BENCH_SHAPES[k].vision,
                           "seq_length": BENCH_SHAPES[k].seq_length, "frames": BENCH_SHAPES[k].frames}
                       for k in pick["shapes"]})
    if a.rows:
        res["rows"] = rows
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{'shape':6s} {'mesh':8s} {'setting':15s} {'saved meas/pred':>24s} {'peak meas/pred':>24s} "
              f"{'offloaded meas/pred':>24s}")
        for c in res["cases"]:
            cells = []
            for fig in ("saved", "peak", "offloaded"):
                f = c["figures"].get(fig)
                cells.append(f"{f['measured']:>9d}/{f['predicted']:<9d}{c['worst'][fig]:+.1%}" if f else f"{'-':>24s}")
            print(f"{c['shape']:6s} {c['mesh']:8s} {c['setting']:15s} " + " ".join(f"{x:>24s}" for x in cells))
        print(f"worst relative error {res['worst_relative_error']:.1%} (tolerance {a.tolerance:.0%}), "
              f"{res['seconds']:.0f} s")
    return 0 if res["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Figures of LongVILA's two-stage MM-SP on CPU ranks (gloo): stage-1 encoder balance and stage-2 routing bytes.

Runs one forward and backward of a LongVILA model (tiny by default) on a micro-batch of videos, an image and
a text-only sample, on every rank of a U x R MM-SP mesh, and reports:
- encoder cost per CP rank (the cost model stage 1 balances) and its imbalance max/mean, next to the best
  possible for equal-cost frames, ceil(F/P)/(F/P), and the measured encoder+projector seconds per rank;
- bytes the stage-2 all-to-all moved, forward and backward, against the minimum (each visual row that
  changes rank crosses the network exactly once) and against replicating all visual rows on every rank
  (an all-gather; what a plain all-reduce re-assembly moves is about twice that).

Example:
    python tools/bench_mmsp.py --hierarchical-context-parallel-sizes 2 2 --videos 2 --frames-per-video 7 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hierarchical-context-parallel-sizes", nargs=2, type=int, default=[2, 2], metavar=("U", "R"),
                   help="MM-SP mesh: U Ulysses ranks x R ring ranks (CP size U*R)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (world = TP * U * R)")
    p.add_argument("--encoder", default="siglip_tiny", help="registered vision encoder")
    p.add_argument("--llm", default="tiny", help="registered LLM shape")
    p.add_argument("--videos", type=int, default=2, help="videos in the micro-batch")
    p.add_argument("--frames-per-video", type=int, default=7, help="frames per video")
    p.add_argument("--frame-size", type=int, nargs="+", default=[56],
                   help="frame sizes in px; videos cycle through them (mixed resolutions cost differently)")
    p.add_argument("--image-size", type=int, default=28, help="size of the one still image (0: none)")
    p.add_argument("--text-tokens", type=int, default=24, help="text tokens per sample")
    p.add_argument("--no-locality", action="store_true", help="stage 1 ignores which rank owns a frame's tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _micro_batch(args, patch: int):
    import torch

    from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch
    from megatron_longvila.plan.frames import tokens_per_frame

    g = torch.Generator().manual_seed(0)
    media_id, sep = 5, 7
    samples = []

    def sample(frames: int, size: int, kind: str):
        ids = torch.randint(10, 90, (3,), generator=g).tolist()
        pos = []
        t = tokens_per_frame(size, size, patch) if frames else 0
        for _ in range(frames):
            pos.append(list(range(len(ids), len(ids) + t)))
            ids += [media_id] * t + [sep]
        ids += torch.randint(10, 90, (args.text_tokens,), generator=g).tolist()
        ids_t = torch.tensor(ids)
        labels = ids_t.clone()
        labels[: len(ids) - args.text_tokens] = IGNORE_INDEX
        media = [Media(token_positions=torch.tensor(pos), frames=torch.randn(frames, 3, size, size, generator=g),
                       kind=kind)] if frames else []
        return LongVILASample(input_ids=ids_t, labels=labels, media=media)

    for v in range(args.videos):
        samples.append(sample(args.frames_per_video, args.frame_size[v % len(args.frame_size)], "video"))
    if args.image_size:
        samples.append(sample(1, args.image_size, "image"))
    samples.append(sample(0, 0, "text"))
    return MicroBatch.from_samples(samples), media_id


def _rank(rank, world, args):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.models.registry import ENCODERS, build_longvila
    from megatron_longvila.parallel import comm
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    U, R = args.hierarchical_context_parallel_sizes
    tp = args.tensor_model_parallel_size
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=U * R,
                                 hierarchical_context_parallel_sizes=[U, R])
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    mesh = build_mmsp_mesh(U, R)
    model = build_longvila(encoder=args.encoder, llm=args.llm, tensor_model_parallel_size=tp,
                           context_parallel_size=U * R, hierarchical_context_parallel_sizes=[U, R],
                           locality_aware=not args.no_locality)
    mb, media_id = _micro_batch(args, ENCODERS[args.encoder].patch_size)
    model.media_token_id = media_id

    from megatron_longvila.runtime.modules import model_device
    from megatron_longvila.batch.microbatch import plan_microbatch

    step = plan_microbatch(model.visual_spec, mb, mesh).to(model_device(model))
    comm.reset_counters()
    loss = model(step)
    fwd = comm.counters()["bytes"].get("cp/mmsp_route", 0)
    loss.backward()
    bwd = comm.counters()["bytes"].get("cp/mmsp_route_bwd", 0)
    # Time this rank's stage-1 work alone (encoder + projector on its frames), outside the collectives.
    t0 = time.perf_counter()
    with torch.no_grad():
        model.encode_local(step)
    enc_s = time.perf_counter() - t0
    rp = step.routing
    hidden = model.language_model.hidden_size
    elt = 4
    out = dict(cp_rank=mesh.cp_rank, tp_rank=ps.get_tensor_model_parallel_rank(), frames=step.frames_encoded,
               load=step.assignment.loads()[mesh.cp_rank], encoder_seconds=enc_s, fwd_bytes=fwd, bwd_bytes=bwd,
               local_rows=rp.local_rows if rp else 0,
               loads=step.assignment.loads(), imbalance=step.assignment.imbalance(),
               min_bytes=rp.min_bytes_total(hidden, elt) if rp else 0,
               total_rows=rp.total_rows if rp else 0, hidden=hidden, tokens=mb.total_len,
               num_frames=len(mb.frames), equal_costs=len(set(step.assignment.costs)) == 1)
    ps.destroy_model_parallel()
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    from megatron_longvila.parallel.launch import run_distributed

    U, R = args.hierarchical_context_parallel_sizes
    P = U * R
    world = P * args.tensor_model_parallel_size
    t0 = time.perf_counter()
    res = run_distributed(_rank, world, args, timeout=900)
    wall = time.perf_counter() - t0
    cp0 = [r for r in res if r["tp_rank"] == 0]  # one CP group (TP replicas route alike)
    first = cp0[0]
    F = first["num_frames"]
    enc_s = [r["encoder_seconds"] for r in sorted(cp0, key=lambda r: r["cp_rank"])]
    mean_s = sum(enc_s) / len(enc_s)
    elt_row = first["hidden"] * 4
    gather_bytes = sum(r["local_rows"] * elt_row * (P - 1) for r in cp0)
    report = {
        "mesh": {"ulysses": U, "ring": R, "cp": P, "tp": args.tensor_model_parallel_size},
        "micro_batch": {"tokens": first["tokens"], "frames": F, "visual_tokens": first["total_rows"],
                        "hidden": first["hidden"], "dtype": "float32"},
        "stage1": {
            "frames_per_rank": [len(r["frames"]) for r in sorted(cp0, key=lambda r: r["cp_rank"])],
            "cost_per_rank": first["loads"],
            "imbalance_max_over_mean": first["imbalance"],
            "equal_cost_bound": (math.ceil(F / P) / (F / P)) if F and first["equal_costs"] else None,
            "encoder_seconds_per_rank": enc_s,
            "encoder_seconds_imbalance": (max(enc_s) / mean_s) if mean_s > 0 else None,
        },
        "stage2": {
            "forward_bytes": sum(r["fwd_bytes"] for r in cp0),
            "backward_bytes": sum(r["bwd_bytes"] for r in cp0),
            "minimum_bytes": first["min_bytes"],
            "forward_over_minimum": (sum(r["fwd_bytes"] for r in cp0) / first["min_bytes"]) if first["min_bytes"] else None,
            "backward_over_minimum": (sum(r["bwd_bytes"] for r in cp0) / first["min_bytes"]) if first["min_bytes"] else None,
            "all_gather_bytes": gather_bytes,
            "locality_aware": not args.no_locality,
        },
        "wall_seconds": wall,
    }
    if args.json:
        print(json.dumps(report))
    else:
        s1, s2 = report["stage1"], report["stage2"]
        print(f"mesh U={U} x R={R} (CP {P}), TP {args.tensor_model_parallel_size}; {F} frames, "
              f"{report['micro_batch']['visual_tokens']} visual tokens of {report['micro_batch']['tokens']}")
        print(f"stage 1: frames per rank {s1['frames_per_rank']}, cost imbalance {s1['imbalance_max_over_mean']:.4f}"
              f" (equal-cost bound {s1['equal_cost_bound']}), measured encoder imbalance "
              f"{s1['encoder_seconds_imbalance']}")
        print(f"stage 2: forward {s2['forward_bytes']} B, backward {s2['backward_bytes']} B, minimum "
              f"{s2['minimum_bytes']} B, all-gather {s2['all_gather_bytes']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

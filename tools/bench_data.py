#!/usr/bin/env python
"""The data feed's figures on CPU ranks: how long each training step waits for its data, with and without the
producer, and whether the TP ranks of one CP position should decode their frames each or share one decode.

    python tools/bench_data.py --json                      both parts, the demo's videos and mesh (4 CPU ranks)
    python tools/bench_data.py --part feed --steps 20 --workers 0 2 --json
    python tools/bench_data.py --part tp --resolution 1280x720 --frames 8 --json

feed: the demo's training (its flags, its H.264 clips, the 2x2 MM-SP mesh on 4 gloo ranks) for --steps steps per
      --workers value; per step the data wait (data_wait_s of the metrics file: the slowest rank's wait in the step's
      first request for data) and the step time. The first step is reported apart (the producer starts with it).
tp:   one video at --resolution, --frames frames selected as training selects them; the time to decode them and run
      SigLIP's preprocessing (the per-rank cost of decoding in parallel) against the time to broadcast the resulting
      pixels from one rank to another over a gloo group (the added cost of decoding once and sharing), per frame.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila.parallel.launch import run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_longvila_example",
                                                  os.path.join(ROOT, "examples", "pretrain_longvila.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(rank, world, manifest, steps, workers, metrics):
    mod = _example()
    argv = list(mod.DEMO_FLAGS)
    argv[argv.index("--train-iters") + 1] = str(steps)
    argv[argv.index("--lr-warmup-iters") + 1] = "1"
    at = argv.index("--save-interval")
    del argv[at:at + 2]
    argv += ["--data-path", manifest, "--num-workers", str(workers), "--metrics-file", metrics, "--log-interval",
             str(10 ** 6), "--no-progress"]
    from megatron_longvila.parallel import comm

    comm.reset_counters()
    mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                 extra_args_provider=mod.extra_args_provider, argv=argv)
    sent = comm.counters()["bytes"]  # what this rank sent for the data feed (the reader: the step's broadcast)
    return {kind: v for kind, v in sent.items() if kind.endswith(("/data_feed", "/data_agreement"))}


def _summary(values):
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)} if values \
        else None


def bench_feed(steps: int, workers, clips: int, tmp: str) -> dict:
    manifest = _example().write_demo_dataset(os.path.join(tmp, "data"), num_videos=clips)
    out = {}
    for k in workers:
        metrics = os.path.join(tmp, f"metrics_{k}.jsonl")
        sent = run_distributed(_train, 4, manifest, steps, k, metrics, timeout=900)
        rows = [json.loads(line) for line in open(metrics)]
        waits = [r["data_wait_s"] for r in rows]
        times = [r["step_time_s"] for r in rows]
        out[str(k)] = {"first_step": {"data_wait_s": waits[0], "step_time_s": times[0]},
                       "data_wait_s": _summary(waits[1:]), "step_time_s": _summary(times[1:]),
                       "data_wait_fraction": sum(waits[1:]) / max(sum(times[1:]), 1e-12),
                       # The reader's broadcast of each step's sequences and the agreement's all-reduce, per step
                       # (bytes the reader sent, gloo's count).
                       "reader_bytes_per_step": {kind: v / steps for kind, v in sent[0].items()}}
    return {"steps": steps, "clips": clips, "mesh": "CP 2x2 on 4 gloo ranks (the demo)", "workers": out}


def _share(rank, world, pixels_shape, repeats):
    import torch
    import torch.distributed as dist

    px = torch.zeros(pixels_shape) if rank == 0 else torch.empty(pixels_shape)
    dist.broadcast(px, 0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        dist.broadcast(px, 0)
        best = min(best, time.perf_counter() - t)
    return best


def bench_tp(resolution: str, frames: int, repeats: int, tmp: str) -> dict:
    from megatron_longvila.data import video
    from megatron_longvila.data.frames import select_frame_indices
    from megatron_longvila.data.image_processor import SiglipImageProcessor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_video import make_video

    w, h = (int(x) for x in resolution.split("x"))
    path = make_video(os.path.join(tmp, "tp.mp4"), "h264", w, h, seconds=8.0)
    info = video.probe_video(path)
    idx = select_frame_indices(info.num_frames, info.fps, num_frames=frames)
    processor = SiglipImageProcessor(384)
    processor(video.decode_frames(path, idx[:1], info=info))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        px = processor(video.decode_frames(path, idx, info=info))
        best = min(best, time.perf_counter() - t)
    share = run_distributed(_share, 2, tuple(px.shape), repeats, timeout=300)[1]
    return {"resolution": resolution, "frames": len(idx), "pixels_mb": px.numel() * px.element_size() / 2 ** 20,
            "decode_and_preprocess_ms_per_frame": 1000 * best / len(idx),
            "gloo_broadcast_ms_per_frame": 1000 * share / len(idx),
            "decision": "decode in parallel" if best <= share else "decode once and share"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["feed", "tp", "all"], default="all")
    p.add_argument("--steps", type=int, default=12, help="training steps per --workers value (feed)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--num-workers values to compare (feed)")
    p.add_argument("--clips", type=int, default=32, help="demo clips to train on (feed)")
    p.add_argument("--resolution", default="1280x720", help="WIDTHxHEIGHT of the tp part's video")
    p.add_argument("--frames", type=int, default=8, help="frames decoded in the tp part")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (tp)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps: give at least 2 (the first step is reported apart)")
    if any(k < 0 for k in args.workers):
        p.error("--workers: values must be >= 0")
    res = {"host": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("feed", "all"):
            res["feed"] = bench_feed(args.steps, args.workers, args.clips, tmp)
        if args.part in ("tp", "all"):
            res["tp"] = bench_tp(args.resolution, args.frames, args.repeats, tmp)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

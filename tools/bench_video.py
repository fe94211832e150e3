#!/usr/bin/env python
"""Decoding speed per backend, codec and resolution: frames per second returned.

Synthetic videos (a moving pattern, H.264 and VP9, keyframe every 2 s) are encoded with PyAV into a
temporary folder, then each available backend decodes (a) `--frames` frames spread uniformly over the
video, the training access pattern, and (b) every frame front to back.

    python tools/bench_video.py --json
    python tools/bench_video.py --resolutions 640x360 1280x720 --seconds 20 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila.data import video  # noqa: E402
from megatron_longvila.errors import BackendUnavailableError, DataError
from megatron_longvila.data.frames import select_frame_indices  # noqa: E402

ENCODERS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm")}


def make_video(path: str, codec: str, width: int, height: int, seconds: float, fps: int = 30) -> str:
    import av

    encoder, _ = ENCODERS[codec]
    with av.open(path, "w") as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = 2 * fps
        if codec == "h264":
            stream.options = {"preset": "ultrafast"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(int(seconds * fps)):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[..., 0] = (xx + 3 * i) % 256
            img[..., 1] = (yy + 2 * i) % 256
            img[..., 2] = ((xx // 16 + yy // 16 + i) % 2) * 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def time_decode(path: str, indices: list[int], backend: str, repeats: int) -> float:
    """Best wall time of `repeats` decodes (the minimum is the least disturbed by other load)."""
    info = video.probe_video(path)
    video.decode_frames(path, indices[:1], backend=backend, info=info)  # warm-up (DALI builds its pipeline)
    video.DECODE_STATS.clear()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        video.decode_frames(path, indices, backend=backend, info=info)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--resolutions", nargs="+", default=["320x240", "640x360"], help="WIDTHxHEIGHT list")
    p.add_argument("--codecs", nargs="+", default=["h264", "vp9"], choices=sorted(ENCODERS))
    p.add_argument("--backends", nargs="+", default=["pyav", "dali_cpu", "dali_gpu"])
    p.add_argument("--seconds", type=float, default=4.0, help="video length")
    p.add_argument("--frames", type=int, default=16, help="frames selected uniformly (the training pattern)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = p.parse_args(argv)

    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        for res in args.resolutions:
            w, h = (int(v) for v in res.lower().split("x"))
            for codec in args.codecs:
                path = make_video(os.path.join(tmp, f"{codec}_{res}{ENCODERS[codec][1]}"), codec, w, h, args.seconds)
                info = video.probe_video(path)
                patterns = {
                    "uniform": select_frame_indices(info.num_frames, info.fps, num_frames=args.frames),
                    "all": list(range(info.num_frames)),
                }
                for backend in args.backends:
                    for name, idx in patterns.items():
                        row = {"backend": backend, "codec": codec, "resolution": res, "pattern": name,
                               "frames": len(idx), "video_frames": info.num_frames}
                        try:
                            sec = time_decode(path, idx, backend, args.repeats)
                        except (BackendUnavailableError, DataError) as e:
                            notes.append(f"{backend}/{codec}: {e}")
                            break
                        row.update(seconds=round(sec, 4), fps=round(len(idx) / sec, 1))
                        if backend == "pyav":
                            # Pictures decoded per call, wanted or not: the cost of reaching the wanted ones.
                            row["decoded_per_call"] = round(video.DECODE_STATS["decoded"] / args.repeats)
                        results.append(row)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "results": results,
        "not_run": sorted(set(notes)),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for r in results:
            print(f"{r['backend']:9s} {r['codec']:5s} {r['resolution']:>10s} {r['pattern']:8s} {r['frames']:5d} frames "
                  f"{r['fps']:9.1f} fps")
        for n in out["not_run"]:
            print("not run:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

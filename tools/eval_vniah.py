#!/usr/bin/env python3
"""V-NIAH: the long-video needle-in-a-haystack evaluation of a LongVILA checkpoint on MM-SP inference.

A haystack video (a real file sampled to N frames, or generated frames) gets its frame embeddings computed once and
cached (safetensors; each rank reads only the rows of the tokens it holds); each needle image is inserted as an
extra frame at a depth percentage; a grid of frame counts x depths is scored teacher-forced (VILA's way: the argmax
at every answer position must be the answer's token) and by greedy generation. Writes all_accuracies.json and
avg_accuracy.txt in VILA's format, heatmap.png (VILA's colours, vmin 0, vmax 1) and details.json.

  torchrun --nproc-per-node 8 tools/eval_vniah.py --load ckpt/long_sft --haystack-video movie.mp4 \\
      --frames 300 600 900 --depths 0 20 40 60 80 100 --out vniah/
  python tools/eval_vniah.py --cpu-ranks 4 --hierarchical-context-parallel-sizes 2 2 --load longvila_vniah/ckpt \\
      --synthetic-haystack --frames 8 16 32 --out vniah/            # CPU ranks, no launcher
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Torch-free: the flags and files are checked before torch and megatron-core load (seconds) and any rank starts.
from megatron_longvila.checkpoint.locate import check_checkpoint_folder  # noqa: E402
from megatron_longvila.errors import ArgumentError  # noqa: E402
from megatron_longvila.parallel.sizes import add_parallel_args, check_parallel_args  # noqa: E402
from megatron_longvila.runtime.entry import ProjectArgumentParser, run_main  # noqa: E402

MODES = ("teacher", "generate")
"""The scorings --modes chooses from."""


def build_parser() -> argparse.ArgumentParser:
    p = ProjectArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint (this project's, HF VILA or NeMo 2)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model, tokenizer.json or a folder holding one (default: the checkpoint's "
                        "llm/ folder when it has one, else bytes)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--haystack-video", help="a video file: frames sampled uniformly to the largest --frames")
    src.add_argument("--synthetic-haystack", action="store_true", help="generated grey-texture frames")
    p.add_argument("--needles", default=None, help="needle set folder (needles.json + images); default: the "
                                                   "project's synthetic set, written into --out/needles")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24, 32], help="haystack frame counts")
    p.add_argument("--depths", type=int, nargs="+", default=[0, 20, 40, 60, 80, 100], help="depth percentages")
    p.add_argument("--modes", default="teacher,generate", help="teacher, generate, or both (comma-separated)")
    p.add_argument("--template", default=None, help="chat template (default: the checkpoint's record)")
    p.add_argument("--cache", default=None, help="folder of the haystack embedding cache (default: --out/cache)")
    p.add_argument("--trained-frames", type=int, default=None, help="draw a dashed line after this frame count")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object (figures) at the end")
    return add_parallel_args(p)


def check_inputs(args) -> None:
    """Every mistake the command line can hold, refused in one line before any rank starts (ArgumentError): the mesh
    against the rank count, the checkpoint folder, the haystack video, the needle set, the grid, the output folders."""
    check_parallel_args(args)
    check_checkpoint_folder(args.load, "--load")
    if args.haystack_video is not None:
        if not os.path.isfile(args.haystack_video):
            raise ArgumentError(f"--haystack-video {args.haystack_video}: "
                                f"{'a folder, not a file' if os.path.isdir(args.haystack_video) else 'no such file'}")
        if not os.access(args.haystack_video, os.R_OK):
            raise ArgumentError(f"--haystack-video {args.haystack_video}: not readable")
    if args.needles is not None and not os.path.isfile(os.path.join(args.needles, "needles.json")):
        raise ArgumentError(f"--needles {args.needles}: no needles.json there (a needle set is a folder with "
                            f"needles.json and its images; leave --needles out for the project's synthetic set)")
    if args.tokenizer_model is not None and not os.path.exists(args.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file or folder")
    if min(args.frames) < 1:
        raise ArgumentError(f"--frames {' '.join(map(str, args.frames))}: every frame count must be 1 or more")
    if not all(0 <= d <= 100 for d in args.depths):
        raise ArgumentError(f"--depths {' '.join(map(str, args.depths))}: depths are percentages, 0 to 100")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise ArgumentError(f"--modes {args.modes}: give {MODES[0]}, {MODES[1]} or both, comma-separated")
    if args.trained_frames is not None and args.trained_frames < 1:
        raise ArgumentError(f"--trained-frames {args.trained_frames}: give 1 or more")
    for flag, path in (("--out", args.out), ("--cache", args.cache)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ArgumentError(f"{flag} {path}: a file, not a folder")


def _tokenizer(args, model):
    from megatron_longvila.inference.session import tokenizer_for

    return tokenizer_for(args.load, args.tokenizer_model, model.record)  # the checkpoint's special tokens, at its ids


def _haystack(args, n: int):
    """The haystack's frames, read by index (each rank decodes only the frames it encodes), and their sampling."""
    from megatron_longvila.inference.vniah import synthetic_haystack, video_haystack

    if args.synthetic_haystack:
        return synthetic_haystack(n, size=64)
    return video_haystack(args.haystack_video, n)


def run(args):
    import torch

    from megatron_longvila.data.image_processor import SiglipImageProcessor
    from megatron_longvila.inference import vniah
    from megatron_longvila.inference.session import load_model, start
    from megatron_longvila.plan.frames import tokens_per_frame

    start(args)
    model, mesh = load_model(args.load, args)
    tok = _tokenizer(args, model)
    rec = model.record
    rank0 = torch.distributed.get_rank() == 0
    size = int(rec.vision["image_size"])
    tpf = tokens_per_frame(size, size, int(rec.vision["patch_size"]))
    template = args.template or rec.tokenizer.get("template") or "chatml"
    from megatron_longvila.models.record import media_settings

    media = media_settings(rec, args)
    sep = media["frame_separator"]
    processor = SiglipImageProcessor(size, mode=media["image_mode"], mean=media["image_mean"], std=media["image_std"])
    needles_dir = args.needles or os.path.join(args.out, "needles")
    if args.needles is None:
        if rank0:
            vniah.write_default_needles(needles_dir)
        torch.distributed.barrier()
    needles = vniah.NeedleSet.load(needles_dir)
    from PIL import Image
    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(n.image).convert("RGB")).copy())
                          for n in needles.needles])
    needle_emb = vniah.encode_frames_projected(model, processor(pixels))
    n_max = max(args.frames)
    cache_dir = args.cache or os.path.join(args.out, "cache")
    cache = os.path.join(cache_dir, f"haystack_{'synthetic' if args.synthetic_haystack else 'video'}_{n_max}.safetensors")
    t0 = time.perf_counter()
    vniah.haystack_embeddings(model, _haystack(args, n_max), cache, mesh, processor)  # rebuilt unless made alike
    # Every frame count uses the first N of the largest sampling (LongVA samples at a fixed rate, so a shorter
    # haystack is the beginning of the same video).
    modes = [m for m in args.modes.split(",") if m]
    cells = len(args.frames) * len(args.depths)

    def progress(k, total):
        if rank0 and sys.stderr.isatty():
            el = time.perf_counter() - t0
            print(f"\r[vniah] {k}/{total} cells, {el:.0f}s, ETA {el / k * (total - k):.0f}s", end="", file=sys.stderr,
                  flush=True)

    results = vniah.run_grid(model, tok, mesh, cache_path=cache, needles=needles, needle_embeddings=needle_emb,
                             frame_counts=args.frames, depths=args.depths, template=template, tokens_per_frame=tpf,
                             frame_separator=sep, modes=modes, progress=progress)
    out = None
    if rank0:
        out = vniah.write_outputs(args.out, results, trained_frames=args.trained_frames)
        out.update(seconds=time.perf_counter() - t0, cells=cells, out=args.out)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    return {"summary": out, "results": results}


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_inputs(args)
    from megatron_longvila.inference.session import launch

    res = launch(run, args)
    if res and res["summary"] is not None:
        s = res["summary"]
        if args.json:
            print(json.dumps(s))
        else:
            print(f"V-NIAH: average accuracy {s['avg_accuracy']:.3f} over {s['cells']} cells in {s['seconds']:.0f}s; "
                  f"heatmap: {os.path.join(args.out, 'heatmap.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # a mistake: one line, once, status 2

#!/usr/bin/env python
"""Read a manifest (or webdataset shards) the way training does and count good and skipped samples.

    python tools/check_data.py data/train.jsonl --json
    {"ok": 9812, "skipped": {"corrupt_video": 3, "missing_file": 12}}

Every sample goes through the training dataset's own preparation (probe, frame selection, chat
template, tokenization); with --decode its selected frames are also decoded, which finds damage inside
a stream that the container headers do not show (slower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila.data.dataset import DataConfig, VideoTextDataset, decode_media  # noqa: E402
from megatron_longvila.errors import DataError
from megatron_longvila.data.tokenizer import load_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="JSONL manifest, or a folder / .tar of webdataset shards")
    p.add_argument("--json", action="store_true", help="print one JSON object {\"ok\": N, \"skipped\": {reason: count}}")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model or tokenizer.json (default: UTF-8 bytes)")
    p.add_argument("--template", default="chatml", help="chat template: chatml, vicuna, plain")
    p.add_argument("--tokens-per-frame", type=int, default=196, help="visual tokens per frame")
    p.add_argument("--num-frames", type=int, default=8, help="frames per video (0: use --fps)")
    p.add_argument("--fps", type=float, default=None, help="sample videos at this rate instead")
    p.add_argument("--max-frames", type=int, default=1024, help="cap on frames taken from one video")
    p.add_argument("--max-video-frames", type=int, default=None, help="skip videos with more source frames")
    p.add_argument("--max-video-duration", type=float, default=None, help="skip videos longer than this (s)")
    p.add_argument("--seq-length", type=int, default=None, help="skip samples with more tokens")
    p.add_argument("--video-backend", default="auto", help="auto, pyav, dali_cpu, dali_gpu")
    p.add_argument("--decode", action="store_true", help="also decode every selected frame")
    p.add_argument("--list", action="store_true", help="print each skipped sample and its reason to stderr")
    p.add_argument("--max-skip-fraction", type=float, default=0.0,
                   help="exit 0 when at most this fraction of the samples was skipped (default 0: any skip fails)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.manifest) or args.manifest.endswith(".tar"):
        from megatron_longvila.data.energon import ShardSource

        source = ShardSource(args.manifest)
    else:
        source = args.manifest
    num_frames = args.num_frames if args.fps is None and args.num_frames > 0 else None
    config = DataConfig(
        template=args.template, tokens_per_frame=args.tokens_per_frame, num_frames=num_frames, fps=args.fps,
        max_frames=args.max_frames, max_video_frames=args.max_video_frames,
        max_video_duration_s=args.max_video_duration, max_seq_len=args.seq_length,
        video_backend=args.video_backend, shuffle=False, max_skip_fraction=1.0,
    )
    dataset = VideoTextDataset(source, load_tokenizer(args.tokenizer), config)
    ok, skipped = 0, Counter()
    for i in range(len(dataset)):
        try:
            sample = dataset.prepare(i)
            if args.decode and sample.media:
                decode_media(sample, backend=args.video_backend)
        except DataError as e:
            skipped[e.reason] += 1
            if args.list:
                print(f"sample {i}: {e}", file=sys.stderr)
            continue
        ok += 1
    bad = sum(skipped.values())
    total = ok + bad
    fraction = bad / total if total else 0.0
    passed = fraction <= args.max_skip_fraction and total > 0
    result = {"ok": ok, "skipped": dict(sorted(skipped.items())), "skip_fraction": fraction, "passed": passed}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ok} of {total} samples usable")
        for reason, n in result["skipped"].items():
            print(f"  skipped {n:6d}  {reason}")
    if not passed:
        what = "no samples" if total == 0 else f"{fraction:.1%} of the samples skipped"
        print(f"check_data: {what} (--max-skip-fraction {args.max_skip_fraction:g}); --list names each bad sample",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

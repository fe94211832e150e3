#!/usr/bin/env python
"""Turn a folder of videos with captions or QA into a JSONL manifest or webdataset shards.

Next to each video `NAME.<ext>` put either
  NAME.txt   a caption (the sample asks --prompt, the caption is the answer), or
  NAME.json  QA: [{"question": ..., "answer": ...}, ...] (also "q"/"a"), or a full
             {"conversations": [...]} in the manifest's format.
Videos without a caption or QA file are listed and left out.

    python tools/make_manifest.py videos/ --output train.jsonl --num-frames 32
    python tools/make_manifest.py videos/ --output shards/ --format shards --samples-per-shard 1000 --energon

--energon (needs megatron-energon) also indexes the shards with Energon's prepare, making the folder a
dataset Energon's loaders read (megatron_longvila/data/energon_loader.py cooks its samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila.errors import DataError
from megatron_longvila.data.manifest import ManifestRecord, MediaRef, write_manifest  # noqa: E402

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def conversations_for(video: str, prompt: str) -> list[dict] | None:
    stem = os.path.splitext(video)[0]
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "conversations" in data:
            return data["conversations"]
        if isinstance(data, dict):
            data = [data]
        turns = []
        for k, qa in enumerate(data):
            q = qa.get("question", qa.get("q"))
            a = qa.get("answer", qa.get("a"))
            if not isinstance(q, str) or not isinstance(a, str):
                raise ValueError(f"{stem}.json: item {k} needs a question and an answer")
            turns += [{"from": "human", "value": ("<video>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        return turns
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            caption = f.read().strip()
        return [{"from": "human", "value": "<video>\n" + prompt}, {"from": "gpt", "value": caption}]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of videos (searched recursively) with .txt captions or .json QA")
    p.add_argument("--output", required=True, help="manifest path (.jsonl), or the shard folder with --format shards")
    p.add_argument("--format", choices=("jsonl", "shards"), default="jsonl")
    p.add_argument("--prompt", default="Describe the video in detail.", help="question asked for a caption")
    p.add_argument("--num-frames", type=int, default=None, help="per-sample num_frames to record")
    p.add_argument("--fps", type=float, default=None, help="per-sample sampling fps to record")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--energon", action="store_true",
                   help="with --format shards: index them for Megatron-Energon (writes OUTPUT/.nv-meta)")
    p.add_argument("--check", action="store_true", help="probe every video and leave out unreadable ones")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_frames is not None and args.fps is not None:
        print("give --num-frames or --fps, not both", file=sys.stderr)
        return 2
    if args.energon and args.format != "shards":
        print("--energon indexes shards: add --format shards", file=sys.stderr)
        return 2
    videos = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(args.folder)
        for name in names
        if name.lower().endswith(VIDEO_EXTS)
    )
    records, left_out = [], Counter()
    for path in videos:
        conv = conversations_for(path, args.prompt)
        if conv is None:
            left_out["no_caption"] += 1
            print(f"no caption or QA for {path}", file=sys.stderr)
            continue
        if args.check:
            from megatron_longvila.data.video import probe_video

            try:
                probe_video(path)
            except DataError as e:
                left_out[e.reason] += 1
                print(f"leaving out {path}: {e}", file=sys.stderr)
                continue
        rel = os.path.relpath(path, args.folder)
        records.append(ManifestRecord(id=os.path.splitext(rel)[0], media=[MediaRef("video", os.path.abspath(path))],
                                      conversations=conv, num_frames=args.num_frames, fps=args.fps))
    if args.format == "jsonl":
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_manifest(records, args.output)
        outputs = [args.output]
    else:
        from megatron_longvila.data.energon import write_shards

        outputs = write_shards(records, args.output, samples_per_shard=args.samples_per_shard)
        if args.energon:
            from megatron_longvila.data.energon import prepare_energon

            with contextlib.redirect_stdout(sys.stderr):  # Energon reports progress on stdout; --json owns it
                outputs.append(prepare_energon(args.output))
    summary = {"samples": len(records), "left_out": dict(sorted(left_out.items())), "outputs": outputs}
    print(json.dumps(summary) if args.json else f"{len(records)} samples -> {', '.join(outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

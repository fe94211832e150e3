"""Verify checkpoints offline: every file against the checkpoint's manifest (size and checksum).

    python tools/check_checkpoint.py CKPT [--all | --iteration N] [--sizes-only] [--json]

CKPT is a --save folder (its latest checkpoint, or every one with --all) or one iteration folder. Exit status 0
when every checked checkpoint is intact, 1 when anything is wrong (the report names each file and what is wrong
with it), 2 for a usage error. A checkpoint without a manifest (saved before manifests, or by the conversion tools)
is checked against its torch_dist metadata: every byte range it references must exist (no checksums).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone


def _targets(path: str, all_: bool, iteration):
    from megatron_longvila.checkpoint.layout import committed_iterations

    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if iteration is not None:
        return [os.path.join(path, f"iter_{iteration:07d}")]
    if all_:
        its = committed_iterations(path)
        if not its:
            raise SystemExit(f"error: {path} holds no iter_* checkpoint folders")
        return [os.path.join(path, f"iter_{i:07d}") for i in reversed(its)]
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise SystemExit(f"error: {tracker} holds {text!r}, not an iteration number")
        d = os.path.join(path, f"iter_{int(text):07d}")
        return [d if os.path.isdir(d) or not os.path.isdir(d + ".old") else d + ".old"]
    if re.match(r"^iter_\d{7}(\.old)?$", os.path.basename(os.path.normpath(path))) or \
            os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(os.path.join(path, "manifest.json")):
        return [path]
    raise SystemExit(f"error: {path} is neither a --save folder (no latest_checkpointed_iteration.txt) nor a "
                     f"checkpoint folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a --save folder or one iter_N folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="every committed iteration under the --save folder")
    g.add_argument("--iteration", type=int, default=None, help="this iteration under the --save folder")
    p.add_argument("--sizes-only", action="store_true", help="check sizes, not checksums (no file is read)")
    p.add_argument("--json", action="store_true", help="one JSON report on stdout")
    a = p.parse_args(argv)

    from megatron_longvila.checkpoint.integrity import check_checkpoint

    if not os.path.isdir(a.checkpoint):
        print(f"error: {a.checkpoint} does not exist", file=sys.stderr)
        return 2
    reports = []
    for folder in _targets(a.checkpoint, a.all, a.iteration):
        if not os.path.isdir(folder):
            reports.append({"path": folder, "ok": False, "manifest": False,
                            "problems": [{"file": "", "problem": "missing"}]})
            continue
        reports.append(check_checkpoint(folder, checksums=not a.sizes_only))
    ok = all(r["ok"] for r in reports)
    if a.json:
        print(json.dumps({"ok": ok, "checkpoints": reports}, indent=1))
    else:
        for r in reports:
            how = (f"{r.get('files', 0)} files, {r.get('bytes', 0) / 2**20:.1f} MiB, {r.get('algorithm')}"
                   if r["manifest"] else r.get("note", "no manifest"))
            print(f"{'OK  ' if r['ok'] else 'BAD '} {r['path']} ({how}, {r.get('seconds', 0):.2f}s)")
            for prob in r["problems"]:
                print(f"     {prob['file']}: {prob['problem']}")
        if not ok:
            print("\nA bad checkpoint is refused by --load; --ckpt-load-newest-valid resumes from the newest one "
                  "that verifies.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

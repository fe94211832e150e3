"""The runner every GPU check tool shares, so a GPU run and its CPU dry run take the same path.

    Section(gpu, dry=None, goal=None, requires=None)   one check: its GPU run, its tiny CPU run, its goal, and what
                                                       it needs (a reason to skip where that is missing)
    Goal(text, judge)                                  a stated goal; judge(result) -> (met, figures)
    run_sections(tool, sections, only, dry_run, res, init) -> exit status
    report_lines(tool, res) -> [str]                   one line per section: figures against the goal, the error, or
                                                       why it skipped (tools/gpu_session.sh's summary.txt)

Rules: a section that raises records its exception's type and message and the others still run; the tool then exits
1. On a GPU a section that misses its goal also makes the exit status 1; in a dry run (tiny sizes on the CPU) the
figures mean nothing, so goals are printed, not enforced. A section whose requirement is missing (Transformer
Engine, CUDA in a dry run) is skipped with the reason and does not fail the run.

Run as a script it writes tools/gpu_session.sh's summary.txt from the tools' result files:
    python3 tools/gpu_sections.py OUT_DIR [--suffix S] TOOL [TOOL ...]

LONGVILA_GPU_CHECK_FAIL=tool:section[,tool:section] makes those sections raise (the harness's error path is tested
on a CPU with it: tests/test_gpu_session.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

FAIL_ENV = "LONGVILA_GPU_CHECK_FAIL"


@dataclass
class Goal:
    """A section's stated goal."""

    text: str
    """What must hold, in words (e.g. "efficiency >= 0.95")."""
    judge: Callable[[Any], Tuple[bool, str]]
    """The section's result -> (the goal is met, the figures that decide it)."""


@dataclass
class Section:
    """One check of a tool."""

    gpu: Callable[[], Any]
    """The check on the GPU; returns its figures (JSON-able)."""
    dry: Optional[Callable[[], Any]] = None
    """The same code at a tiny size on the CPU (None: the section has no dry mode and is skipped in a dry run)."""
    goal: Optional[Goal] = None
    """Its goal, judged on the GPU."""
    requires: Optional[Callable[[bool], Optional[str]]] = None
    """dry_run -> the reason it cannot run here (None: it can)."""


def _injected(tool: str, name: str) -> bool:
    wanted = {w.strip() for w in os.environ.get(FAIL_ENV, "").split(",") if w.strip()}
    return f"{tool}:{name}" in wanted


def run_sections(tool: str, sections: Dict[str, Section], only: Sequence[str], dry_run: bool, res: dict,
                 init: Callable[[str], None]) -> int:
    """Run the selected sections into res[name] and res["report"][name]; returns the exit status: 0, 1 (a section
    raised, or missed its goal on the GPU), 2 (no GPU and not a dry run)."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        print(f"tools/{tool}.py needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run to check the "
              f"script on a CPU", file=sys.stderr)
        return 2
    device = "cpu" if dry_run else "cuda"
    init(device)
    res["device"] = "cpu (dry run: tiny sizes, figures mean nothing)" if dry_run else torch.cuda.get_device_name(0)
    report = res.setdefault("report", {})
    status = 0
    for name in only:
        sec = sections[name]
        t0 = time.perf_counter()
        why = sec.requires(dry_run) if sec.requires else None
        if why is None and dry_run and sec.dry is None:
            why = "no dry mode: runs on the GPU only"
        if why is not None:
            report[name] = {"status": "skipped", "reason": why}
            continue
        try:
            if _injected(tool, name):
                raise RuntimeError(f"failure injected by {FAIL_ENV} (a test of the harness)")
            result = (sec.dry if dry_run else sec.gpu)()
            res[name] = result
        except Exception as e:  # one failing section must not lose the others' figures
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            status = 1
            continue
        finally:
            res.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 3)
            if device == "cuda":
                torch.cuda.empty_cache()
        entry = {"status": "ok"}
        if sec.goal is not None:
            try:
                met, figures = sec.goal.judge(result)
            except Exception as e:  # a result the goal cannot read is a failure of the section
                met, figures = False, f"the result has no figures for the goal ({type(e).__name__}: {e})"
            entry.update(goal=sec.goal.text, figures=figures, met=None if dry_run else bool(met))
            if not dry_run and not met:
                entry["status"] = "goal missed"
                status = 1
        report[name] = entry
    res["status"] = status
    return status


def report_lines(tool: str, res: dict) -> List[str]:
    """One line per section of a tool's result (see the module docstring)."""
    lines = []
    dry = str(res.get("device", "")).startswith("cpu")
    for name, r in (res.get("report") or {}).items():
        head = f"{tool}.{name}: "
        if r["status"] == "error":
            lines.append(head + "ERROR " + r["error"])
        elif r["status"] == "skipped":
            lines.append(head + "skipped: " + r["reason"])
        elif "goal" in r:
            verdict = "not judged (dry run)" if dry else ("met" if r["met"] else "MISSED")
            lines.append(head + f"{r['figures']} | goal {r['goal']}: {verdict}")
        else:
            figures = json.dumps(res.get(name), default=str)
            lines.append(head + "ok " + (figures if len(figures) <= 160 else figures[:157] + "..."))
    return lines


def emit(res: dict, as_json: bool) -> None:
    """Print a tool's result: one JSON object (also when a section failed, so the figures are kept)."""
    print(json.dumps(res, default=str) if as_json else json.dumps(res, indent=1, default=str), flush=True)


def _last_json(text: str) -> Optional[dict]:
    for line in reversed(text.splitlines()):  # a tool's result is its last JSON line
        try:
            res = json.loads(line)
        except ValueError:
            continue
        return res if isinstance(res, dict) else None
    return None


def summary_lines(out: str, suffix: str, names: Sequence[str]) -> List[str]:
    """summary.txt: the environment, then per tool its exit line and one line per section (or its last words)."""
    def read(name: str) -> str:
        path = os.path.join(out, name)
        return open(path).read() if os.path.exists(path) else ""

    lines = [read(f"environment{suffix}.txt").strip()]
    runs = {line.split(":", 1)[0]: line.strip() for line in read(f"runs{suffix}.txt").splitlines() if line.strip()}
    for n in names:
        lines.append(runs.get(n, f"{n}: not run"))
        path = os.path.join(out, f"{n}{suffix}.json")
        if not os.path.exists(path):
            continue
        text = read(f"{n}{suffix}.json").strip()
        res = _last_json(text)
        if res is not None and "report" in res:
            lines.extend("  " + line for line in report_lines(n, res))
        else:  # not a sectioned tool (pytest), or it died before printing: its last words
            err = read(f"{n}{suffix}.err").strip().splitlines()
            tail = [line for line in text.splitlines() + err if line.strip()][-3:]
            lines.append(f"  {n}: " + (" | ".join(tail) if tail else "no output"))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="Write the summary of a GPU session (tools/gpu_session.sh) from the result files in OUT_DIR: "
                    "per tool its exit line, then each section's figures against its goal, its error, or why it "
                    "skipped.")
    p.add_argument("out", metavar="OUT_DIR", help="folder with environment.txt, runs.txt and TOOL.json/.err files")
    p.add_argument("tools", metavar="TOOL", nargs="+", help="the tools to summarize, in order (train, attention, ...)")
    p.add_argument("--suffix", default="", help="file-name suffix of the run (gpu_session.sh uses "
                                                "'_dry_run' for a dry run)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        p.error(f"OUT_DIR {args.out!r} is not a folder")
    print("\n".join(summary_lines(args.out, args.suffix, args.tools)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

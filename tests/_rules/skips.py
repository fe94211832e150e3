"""Rule 2: a test skips only for a reason on ALLOWED, and only where that reason is true.

Every dependency of the tests is installed by `pip install -e '.[test]'` on any machine (transformers, PyAV, DALI's
CPU wheel, Megatron-Energon, ...), so a skip for one of them hides a broken environment. What cannot be had on a
CPU machine is allowed: CUDA, Transformer Engine and DALI's GPU decoder need a GPU (and the GPU path's own tests
skip on the CPU ones, those of the CPU path where a GPU is present), and a Megatron-LM checkout is a source tree
set up by hand (MEGATRON_LM_PATH, docs/TRAINING.md). Each entry matches a skip's reason and says when it is true,
so a skip that gives an allowed reason where it is false fails too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _te() -> bool:
    from megatron_longvila.runtime.probes import te_available

    return te_available()


def _dali_gpu() -> bool:
    from megatron_longvila.data.video import dali_available

    return _cuda() and dali_available()


def _megatron_lm() -> bool:
    path = os.environ.get("MEGATRON_LM_PATH")
    return bool(path) and os.path.isdir(os.path.join(path, "megatron", "training"))


@dataclass(frozen=True)
class AllowedSkip:
    """A reason a test may skip for."""

    pattern: str
    """Regular expression searched in the skip's reason."""
    why: str
    """Why it is allowed."""
    holds: Callable[[], bool]
    """Whether the reason is true here."""


ALLOWED: Tuple[AllowedSkip, ...] = (
    AllowedSkip(r"needs a CUDA device and an importable transformer_engine",
                "Transformer Engine's kernels run on a GPU only", lambda: not (_cuda() and _te())),
    AllowedSkip(r"^backend 'te(_fp8)?'", "this GPU or its Transformer Engine offers no such fused attention",
                lambda: _cuda() and _te()),
    AllowedSkip(r"needs (a CUDA device|a GPU|CUDA)\b", "a GPU-only path", lambda: not _cuda()),
    AllowedSkip(r"needs DALI's GPU decoder", "DALI decodes on a GPU only", lambda: not _dali_gpu()),
    AllowedSkip(r"CUDA is visible here|a GPU is present", "the CPU-only path's test, on a GPU machine", _cuda),
    AllowedSkip(r"Transformer Engine (is importable|imports) here", "the path without Transformer Engine's test, "
                "where it is installed (GPU machines)", _te),
    AllowedSkip(r"needs a Megatron-LM checkout: set MEGATRON_LM_PATH", "a Megatron-LM source tree is set up by hand "
                "(docs/TRAINING.md)", lambda: not _megatron_lm()),
)


def verdict(reason: str) -> Optional[str]:
    """None when `reason` is allowed here, else why not."""
    for entry in ALLOWED:
        if re.search(entry.pattern, reason):
            return None if entry.holds() else f"says '{entry.pattern}', which is not so on this machine"
    return "not an allowed reason (tests/_rules/skips.py)"


def reason_of(report) -> str:
    """The reason of a skipped test or collector report."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


class SkipRule:
    """Collects every skip and fails the run on one that is not allowed."""

    def __init__(self) -> None:
        self.refused: List[Tuple[str, str, str]] = []  # (node id, reason, why refused)

    def _note(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = reason_of(report)
            why = verdict(reason)
            if why is not None:
                self.refused.append((report.nodeid, reason, why))

    def pytest_runtest_logreport(self, report) -> None:
        self._note(report)

    def pytest_collectreport(self, report) -> None:
        self._note(report)

    def pytest_sessionfinish(self, session) -> None:
        if self.refused and session.exitstatus == 0:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.refused:
            tr = terminalreporter
            tr.section("skips not allowed (the run fails)", sep="=", red=True, bold=True)
            for nodeid, reason, why in self.refused:
                tr.line(f"{nodeid}: {reason}  [{why}]")
            tr.line("A test may skip only for a GPU-only dependency or a Megatron-LM checkout (tests/_rules/skips.py); "
                    "install what the others need: pip install -e '.[test]'")

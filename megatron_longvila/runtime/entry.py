"""What every rank of a script does alike at its edges: one voice for configuration errors, fault messages that
torchrun shows as the root cause, start-up notes printed once.

    run_main(fn, *args) -> int      call fn; an error marked raised alike on every rank (errors.RaisedAlike) is
                                    printed once, by rank 0, as `error: <type>: <message>` (no traceback), and gives
                                    status 2; any other exception propagates with its traceback, printed by the rank
                                    that raised it (torchrun's summary names that rank)
    once(text)                      print a message that every rank would print alike, from rank 0 only
    report(message, since=None)     print a fault message on this rank and hand it to torchrun as this rank's error
    run_prefix() -> str             a key prefix unique to this launch attempt, for the rendezvous store
    rank() -> int                   this process's global rank (the launcher's RANK before torch.distributed starts)
    ProjectArgumentParser           argparse whose usage errors are ArgumentError and whose --help prints once

Under torchrun a message goes into the rank's error file (TORCHELASTIC_ERROR_FILE) as well, so torchrun's failure
summary quotes it instead of a traceback; its first failure is the one with the earliest timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

from ..errors import ArgumentError, raised_alike

__all__ = ["run_main", "once", "report", "run_prefix", "rank", "ProjectArgumentParser"]


def rank() -> int:
    """This process's global rank: torch.distributed's when it runs, else the launcher's RANK (0 without one)."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # a half-torn-down process group: fall back to the environment
        pass
    return int(os.environ.get("RANK", "0"))


def once(text: str, stream=None) -> None:
    """Print a message that every rank would print alike, from rank 0 only."""
    if rank() == 0:
        print(text, file=stream or sys.stdout, flush=True)


def _write_error_file(message: str, since: Optional[float]) -> bool:
    """Hand `message` to torchrun as this rank's error; False when not under torchrun (or the file is unwritable)."""
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not err_file:
        return False
    stamp = str(int(since if since is not None else time.time()))
    try:
        with open(err_file, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": stamp}}},
                      f)
    except OSError:
        return False
    return True


def report(message: str, since: Optional[float] = None) -> None:
    """Print a fault message on stderr and hand it to torchrun as this rank's error, so that torchrun's failure
    summary shows it as the root cause (`since`: the time the fault began, when known)."""
    print(message, file=sys.stderr, flush=True)
    _write_error_file(message, since)


def run_prefix() -> str:
    """A store-key prefix unique to this launch attempt (torchrun's agent store outlives restarts)."""
    return f"longvila/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"


def _report_once(e: BaseException) -> None:
    if rank() != 0:
        return
    msg = f"{type(e).__name__}: {e}"
    # Under torchrun the error file is the whole report (no traceback); otherwise one line on stderr.
    if not _write_error_file(msg, None):
        print(f"error: {msg}", file=sys.stderr, flush=True)


def run_main(fn: Callable, *args, **kwargs) -> int:
    """Run an entry point; an error raised alike on every rank is reported once and gives status 2."""
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        if not raised_alike(e):
            raise
        _report_once(e)
        return 2
    return out if isinstance(out, int) else 0


class ProjectArgumentParser(argparse.ArgumentParser):
    """argparse, for scripts that every rank runs: a usage error raises ArgumentError (reported once by run_main,
    not printed by every rank), and --help prints from rank 0 only."""

    def error(self, message):
        raise ArgumentError(f"{message} (see --help)")

    def print_help(self, file=None):
        if rank() == 0:
            super().print_help(file)

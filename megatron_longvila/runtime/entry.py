"""What every rank of a script does alike at its edges: one voice for configuration errors, fault messages that
torchrun shows as the root cause, start-up notes printed once.

    run_main(fn, *args) -> int      call fn; an error marked raised alike on every rank (errors.RaisedAlike) is
                                    printed once, by rank 0, as `error: <type>: <message>` (no traceback), and gives
                                    status 2; any other exception is printed by the rank that raised it, as its
                                    traceback and `[rank R] error: <type>: <message>`, and gives status 1. Either way
                                    the failure is posted to the job's peers (set_peers), which end promptly
    once(text)                      print a message that every rank would print alike, from rank 0 only
    report(message, since=None)     print a fault message on this rank and hand it to torchrun as this rank's error
    run_prefix() -> str             a key prefix unique to this launch attempt, for the rendezvous store
    rank() -> int                   this process's global rank (the launcher's RANK before torch.distributed starts)
    ProjectArgumentParser           argparse whose usage errors are ArgumentError and whose --help prints once
    set_peers(peers) / Peers        how run_main tells the other ranks of a failure (the training watchdog is one)

A failure only some ranks meet (one rank's data or files, an error marked alike that rank 0 did not raise) must not
leave the others waiting in a collective until --distributed-timeout-minutes: run_main posts it through the peers
the trainer registered (training.watchdog posts it on the rendezvous store, where every rank's monitor thread
sees it and ends its process). A rank other than 0 that raises an error marked alike waits up to ALIKE_WAIT_S for
rank 0 to report the same error; when rank 0 does not, it prints the error itself, naming its rank.

Under torchrun a message goes into the rank's error file (TORCHELASTIC_ERROR_FILE) as well, so torchrun's failure
summary quotes it instead of a traceback; its first failure is the one with the earliest timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Callable, Optional, Protocol

from ..errors import ArgumentError, raised_alike

__all__ = ["run_main", "once", "report", "run_prefix", "rank", "ProjectArgumentParser", "Peers", "set_peers",
           "ALIKE_WAIT_S"]

ALIKE_WAIT_S = 3.0
"""How long a rank other than 0 that raised an error marked alike waits for rank 0 to report it (the ranks reach
the same check within a second of each other: argument validation follows the process group's rendezvous)."""


class Peers(Protocol):
    """The other ranks of this job, as run_main needs them (training.watchdog.Watchdog is one)."""

    def post_failure(self, text: str, *, alike: bool) -> None:
        """Tell every rank that this one failed with `text` (an error marked alike or not)."""

    def mark_printed(self) -> None:
        """Rank 0 printed the error marked alike that it raised."""

    def wait_printed(self, timeout_s: float) -> bool:
        """Whether rank 0 printed an error marked alike, waiting up to `timeout_s`."""

    def wait_acknowledged(self) -> None:
        """Until the other ranks have seen the failure (bounded): a process that hosts the store keeps it up."""


_PEERS: list = [None]


def set_peers(peers: Optional[Peers]) -> None:
    """Register how run_main reaches the other ranks (None: no peers, as before the process group exists)."""
    _PEERS[0] = peers


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


def _write_error_file(message: str, since: Optional[float], callstack: Optional[str] = None) -> bool:
    """Hand `message` to torchrun as this rank's error; False when not under torchrun (or the file is unwritable)."""
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not err_file:
        return False
    stamp = str(int(since if since is not None else time.time()))
    try:
        with open(err_file, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": callstack or message,
                                                                      "timestamp": stamp}}}, f)
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


def _failed(e: BaseException) -> int:
    """Print `e` where the project's standards say (module docstring), post it to the peers; the exit status."""
    peers = _PEERS[0]
    me = rank()
    text = f"{type(e).__name__}: {e}"
    if raised_alike(e):
        if me == 0:
            _report_once(e)
            if peers is not None:
                peers.mark_printed()
                peers.post_failure(text, alike=True)
        elif peers is not None:
            peers.post_failure(text, alike=True)
            if not peers.wait_printed(ALIKE_WAIT_S):  # rank 0 did not raise it: this rank's alone after all
                line = f"[rank {me}] error: {text}"
                print(line, file=sys.stderr, flush=True)
                _write_error_file(line, None)
                peers.mark_printed()
        if peers is not None:
            peers.wait_acknowledged()
        return 2
    stack = traceback.format_exc()
    line = f"[rank {me}] error: {text}"
    # The traceback, then the one line that names the rank (launchers interleave the ranks' output).
    print(stack + line, file=sys.stderr, flush=True)
    _write_error_file(line, None, callstack=stack + line)
    if peers is not None:
        peers.post_failure(text, alike=False)
        peers.wait_acknowledged()
    return 1


def run_main(fn: Callable, *args, **kwargs) -> int:
    """Run an entry point: status 0 (or its int), 2 after an error raised alike on every rank (reported once), 1
    after any other error (reported by the rank that raised it); see the module docstring."""
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        return _failed(e)
    return out if isinstance(out, int) else 0


class ProjectArgumentParser(argparse.ArgumentParser):
    """argparse, for scripts that every rank runs: a usage error raises ArgumentError (reported once by run_main,
    not printed by every rank), and --help prints from rank 0 only."""

    def error(self, message):
        raise ArgumentError(f"{message} (see --help)")

    def print_help(self, file=None):
        if rank() == 0:
            super().print_help(file)

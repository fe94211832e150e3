"""One voice under torchrun: configuration errors printed once, by rank 0, without a traceback.

Errors of argument and configuration validation are the same on every rank (every rank parses the same flags and
builds the same plan), so printing them from every rank only buries the message: `run_main(fn)` prints them once,
from rank 0, as `error: <message>`, and every rank exits with status 2. Under torchrun the message goes into
torchrun's error file of rank 0 instead (no traceback), so torchrun's failure summary shows it as the root cause.
Any other exception is a failure of one rank: it propagates with its traceback, printed by the rank that raised it
(torchrun's summary names that rank).

    USER_ERRORS                 the exception types that are configuration / validation errors
    run_main(fn, *args) -> int  call fn; report a configuration error once; return the exit status
    once(text)                  print a start-up note once (rank 0)
    ProjectArgumentParser       argparse whose usage errors are ArgumentError and whose --help prints once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

__all__ = ["USER_ERRORS", "run_main", "once", "ProjectArgumentParser", "user_error_types"]


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # torch not importable yet: fall back to the launcher's environment
        pass
    return int(os.environ.get("RANK", "0"))


def once(text: str, stream=None) -> None:
    """Print a message that every rank would print alike, from rank 0 only."""
    if _rank() == 0:
        print(text, file=stream or sys.stdout, flush=True)


def user_error_types() -> tuple:
    """Exception types raised by start-up validation (imported lazily: some modules are heavy)."""
    from ..config import MMSPConfigError
    from ..data.errors import SkipThresholdExceeded
    from ..models.record import RecordMismatch
    from ..parallel.mesh import MeshError
    from .arguments import ArgumentError
    from .checkpoint import CheckpointError

    types = [ArgumentError, MMSPConfigError, RecordMismatch, CheckpointError, SkipThresholdExceeded, MeshError]
    try:
        from ..conversion.mappings import ConversionError

        types.append(ConversionError)
    except ImportError:
        pass
    try:
        from ..inference.generate import InferenceError

        types.append(InferenceError)
    except ImportError:
        pass
    return tuple(types)


USER_ERRORS = None  # resolved on first use (see user_error_types)


def _report(e: BaseException) -> None:
    msg = f"{type(e).__name__}: {e}"
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if _rank() != 0:
        return
    if err_file:
        # torchrun shows rank 0's error file as the root cause of its failure summary; the message is the whole of it.
        with open(err_file, "w") as f:
            json.dump({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    else:
        print(f"error: {msg}", file=sys.stderr, flush=True)


def run_main(fn: Callable, *args, **kwargs) -> int:
    """Run an entry point; a configuration error is reported once (see the module docstring) and gives status 2."""
    global USER_ERRORS
    if USER_ERRORS is None:
        USER_ERRORS = user_error_types()
    try:
        out = fn(*args, **kwargs)
    except USER_ERRORS as e:  # noqa: B030  (a tuple resolved at run time)
        _report(e)
        return 2
    return out if isinstance(out, int) else 0


class ProjectArgumentParser(argparse.ArgumentParser):
    """argparse, for scripts that every rank runs: a usage error raises ArgumentError (reported once by run_main,
    not printed by every rank), and --help prints from rank 0 only."""

    def error(self, message):
        from .arguments import ArgumentError

        raise ArgumentError(f"{message} (see --help)")

    def print_help(self, file=None):
        if _rank() == 0:
            super().print_help(file)

"""The one process-group timeout every group of a run gets (Megatron's --distributed-timeout-minutes).

    set_group_timeout(timeout)     the run's timeout (the project's loop sets it from the flag)
    group_timeout() -> timedelta   for `dist.new_group(..., timeout=group_timeout())`

`dist.new_group` does not inherit the default group's timeout: without `timeout=` it takes torch's backend default
(30 minutes), so a hung collective on one of the project's own groups would outwait the flag. When no timeout was
set here (megatron.training initialized the default group itself), the default group's own timeout is used.
"""

from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

from ..runtime.versions import applying

__all__ = ["set_group_timeout", "group_timeout", "DEFAULT_TIMEOUT_MINUTES"]

DEFAULT_TIMEOUT_MINUTES = 10
"""Megatron's default for --distributed-timeout-minutes."""

_TIMEOUT: Optional[datetime.timedelta] = None


def set_group_timeout(timeout: Optional[datetime.timedelta]) -> None:
    global _TIMEOUT
    _TIMEOUT = timeout


def _default_group_timeout() -> Optional[datetime.timedelta]:
    """The default group's timeout (a private attribute of torch's backends; None where it is not readable)."""
    if not dist.is_initialized():
        return None
    applying("pg_backend_options")
    pg = dist.group.WORLD
    for device in ((torch.device("cuda"),) if torch.cuda.is_available() else ()) + (torch.device("cpu"),):
        try:
            return pg._get_backend(device).options._timeout
        except Exception:  # no backend for this device, or an older torch without options
            continue
    return None


def group_timeout() -> datetime.timedelta:
    """The timeout for a new process group: the run's, else the default group's, else Megatron's default."""
    return _TIMEOUT or _default_group_timeout() or datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)

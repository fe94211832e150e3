"""Test-only: one rank's view of the files differs from its peers', as on a node whose network file system is stale
or failing, without special privileges.

    HIDE_ENV = "MEGATRON_LONGVILA_HIDE_FILES"
        semicolon-separated `kind@R:pattern` items; on global rank R a path matching the fnmatch `pattern` (its
        absolute or given spelling, or one of its parent folders) is
            eio      unreadable: opening it raises OSError(EIO), as a failing network read does
            missing  invisible: it does not exist (a stale directory listing); opening raises FileNotFoundError
    check_readable(path)     raises as above where this rank is told so; nothing otherwise
    visible(path) -> bool    os.path.exists, except where this rank is told the path is missing

The data readers (video probe and decode, images) and the checkpoint readers call these before touching a file.
Production code reads the variable once per process; unset, each call is one attribute test.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from typing import List, Optional, Tuple

__all__ = ["HIDE_ENV", "check_readable", "visible", "hidden_kind"]

HIDE_ENV = "MEGATRON_LONGVILA_HIDE_FILES"
"""Test-only: files this rank cannot read or see (see the module docstring)."""

_KINDS = ("eio", "missing")
_rules: Optional[List[Tuple[str, int, str]]] = None


def _parse(text: str) -> List[Tuple[str, int, str]]:
    rules = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        try:
            kind, rest = item.split("@", 1)
            rank, pattern = rest.split(":", 1)
            rules.append((kind, int(rank), pattern))
        except ValueError:
            raise ValueError(f"{HIDE_ENV}: {item!r} is not kind@rank:pattern") from None
        if kind not in _KINDS:
            raise ValueError(f"{HIDE_ENV}: unknown kind {kind!r} in {item!r} (one of {', '.join(_KINDS)})")
    return rules


def _this_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def hidden_kind(path) -> Optional[str]:
    """"eio" or "missing" where this rank is told so for `path`, else None."""
    global _rules
    if _rules is None:
        _rules = _parse(os.environ.get(HIDE_ENV, ""))
    if not _rules:
        return None
    path = os.fspath(path)
    rank = _this_rank()
    names = {path, os.path.abspath(path)}
    parent = os.path.abspath(path)
    while os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
        names.add(parent)
    for kind, r, pattern in _rules:
        if r == rank and any(fnmatch.fnmatch(n, pattern) for n in names):
            return kind
    return None


def check_readable(path) -> None:
    """Raise what reading `path` would raise on a rank told it cannot (see the module docstring)."""
    kind = hidden_kind(path)
    if kind == "eio":
        raise OSError(errno.EIO, f"Input/output error (injected by {HIDE_ENV})", os.fspath(path))
    if kind == "missing":
        raise FileNotFoundError(errno.ENOENT, f"No such file or directory (injected by {HIDE_ENV})", os.fspath(path))


def visible(path) -> bool:
    """os.path.exists(path), False where this rank is told `path` is missing."""
    return hidden_kind(path) != "missing" and os.path.exists(path)

"""The processes a launcher started, found by an environment marker and ended: how the multi-process harness and the
test run reap what they start (Linux: reads /proc).

A launcher adds a token of its own to `MARK_VAR` in the environment of the processes it starts. Every process they
start inherits it wherever it ends up: in a session of its own (torch elastic's workers), or re-parented after its
parent was killed (a rank's checkpoint-writer helper). So the launcher finds them by the token, never by name. Two
kinds of process do not show it: one that replaces its whole environment, and a child forked without exec (its
/proc environment is its parent's at exec time); a launcher reaps the latter through the process group.

    MARK_VAR                        the environment variable that carries the tokens (comma-separated)
    new_mark() -> str               a fresh token
    with_mark(env, token) -> env    a copy of `env` with the token added
    marked(token) -> [pid]          live processes of this user carrying the token (this one and zombies left out)
    describe(pid) -> str            "pid 123, started 4.2 s ago: <command line>"
    started_at(pid) -> float        its start, in seconds since boot (CLOCK_BOOTTIME)
    end(pids, wait) -> [pid]        SIGKILL each (a stopped process too), wait for them to go; returns those it killed
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Dict, Iterable, List, Optional

__all__ = ["MARK_VAR", "new_mark", "with_mark", "marked", "describe", "started_at", "end", "alive"]

MARK_VAR = "MEGATRON_LONGVILA_PROCESS_MARK"
_TICKS = os.sysconf("SC_CLK_TCK")


def new_mark() -> str:
    return uuid.uuid4().hex[:16]


def with_mark(env: Dict[str, str], token: str) -> Dict[str, str]:
    """A copy of `env` whose MARK_VAR also carries `token` (tokens of enclosing launchers are kept)."""
    out = dict(env)
    out[MARK_VAR] = ",".join(t for t in (env.get(MARK_VAR), token) if t)
    return out


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/<pid>/stat's fields from the state on (field 3), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running or stopped (a zombie has exited: it only waits to be reaped)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _tokens(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # gone, or another user's
        return []
    prefix = MARK_VAR.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace").split(",")
    return []


def marked(token: str) -> List[int]:
    """Live processes carrying `token`, this one left out."""
    me = os.getpid()
    return sorted(int(d) for d in os.listdir("/proc")
                  if d.isdigit() and int(d) != me and token in _tokens(int(d)) and alive(int(d)))


def started_at(pid: int) -> Optional[float]:
    st = _stat(pid)
    return int(st[19]) / _TICKS if st is not None else None


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    t = started_at(pid)
    age = f", started {time.clock_gettime(time.CLOCK_BOOTTIME) - t:.1f} s ago" if t is not None else ""
    return f"pid {pid}{age}: {cmd[:300]}"


def end(pids: Iterable[int], wait: float = 5.0) -> List[int]:
    """SIGKILL each live process of `pids` and wait up to `wait` seconds for them to be gone; returns those killed."""
    killed = []
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:  # exited meanwhile
                pass
    deadline = time.monotonic() + wait
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed

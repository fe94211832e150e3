"""Rule 3: no process the test run started outlives it.

At start-up the run adds a token of its own to the marker variable of its environment (runtime.processes), which
every process it starts inherits. At its end, after the harness's start server and resource tracker are stopped
(parallel.launch.stop_helpers: they would otherwise end only with this process), every process still carrying the
token, or still a child of this one, gets GRACE seconds to exit; those left are killed, listed with the test that
was running when each started, and fail the run.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

from megatron_longvila.parallel.launch import stop_helpers
from megatron_longvila.runtime import processes

GRACE = 5.0
"""Seconds a process of the run has to exit after the last test ended (a rank's own teardown, an agent's exit)."""


def _children(pid: int) -> List[int]:
    """Children started by any thread of `pid`."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # gone meanwhile
        pass
    return out


def descendants(pid: int) -> List[int]:
    """Live descendants of `pid` (zombies left out)."""
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        if processes.alive(p):
            out.append(p)
        todo.extend(_children(p))
    return out


class LeftoverRule:
    def __init__(self) -> None:
        self.token = processes.new_mark()
        os.environ.update(processes.with_mark(os.environ, self.token))
        self.tests: List[Tuple[float, float, str]] = []  # (start, end) in seconds since boot, node id
        self._current: Optional[Tuple[float, str]] = None
        self.left: List[str] = []

    @staticmethod
    def _now() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def pytest_runtest_logstart(self, nodeid) -> None:
        self._current = (self._now(), nodeid)

    def pytest_runtest_logfinish(self, nodeid) -> None:
        if self._current is not None:
            self.tests.append((self._current[0], self._now(), nodeid))
            self._current = None

    def _started_by(self, pid: int) -> str:
        t = processes.started_at(pid)
        if t is None:
            return "?"
        # /proc's start time is truncated to a clock tick: the process started in [t, t + tick).
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        during = [nodeid for start, end, nodeid in self.tests if start <= t + tick and t <= end]
        if not during:
            return "outside any test (a fixture's set-up or teardown between tests, or the session's own)"
        return during[0] if len(during) == 1 else f"one of {', '.join(during)} (within one clock tick)"

    def _ours(self) -> List[int]:
        return sorted(set(processes.marked(self.token)) | set(descendants(os.getpid())))

    @staticmethod
    def _wait(pids: List[int], seconds: float) -> List[int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(processes.alive(p) for p in pids):
            time.sleep(0.05)
        return [p for p in pids if processes.alive(p)]

    def pytest_sessionfinish(self, session) -> None:
        stop_helpers()
        left = self._wait(self._ours(), GRACE)
        left = sorted(set(left) | set(self._ours()))  # and what they started meanwhile
        if left:
            self.left = [f"{processes.describe(p)}\n    started during: {self._started_by(p)}" for p in left]
            processes.end(left)
            if session.exitstatus == 0:
                session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.left:
            tr = terminalreporter
            tr.section("processes left running by the tests (killed; the run fails)", sep="=", red=True, bold=True)
            for line in self.left:
                tr.line(line)
            tr.line(f"Found by the marker {processes.MARK_VAR} ({self.token}) or as children of the test process, "
                    f"alive {GRACE:.0f} s after the last test: the test (or its harness) must end what it starts.")

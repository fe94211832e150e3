"""The hang watchdog: a step far longer than the recent median ends the job with a message naming the rank(s) that did
not arrive, instead of waiting out --distributed-timeout-minutes.

    WatchdogConfig                      its settings (the --watchdog-* flags)
    Watchdog.start(config, prefix=, resume=) -> Watchdog | None   one per rank; None without a TCP store
        .begin_step(iteration) / .end_step(iteration, ok)
        .peer_failure(exception, iteration) -> FaultExit           a collective failed: name the lost peer
        .close()

How: every rank runs a thread that, each --watchdog-interval seconds, writes a heartbeat into the job's c10d store
(its own TCP connection to the rendezvous store, so a main thread blocked in a collective does not block it): a
sequence number, the iteration, and whether the main thread is inside torch.distributed (waiting on peers) or
where it is. The same thread times this rank's step. Once a step runs longer than
max(--watchdog-min-seconds, --watchdog-step-factor x the median of the last steps), the first rank to notice
(an atomic counter in the store) reads every rank's heartbeat twice, a few intervals apart, and names the ranks
that did not arrive: a heartbeat that stopped (a stopped, frozen or dead process; on the same host the process
state says which), a rank still in an earlier iteration or between steps, or a rank busy outside any collective
while the others wait. It prints that once, sets an abort key that every rank's thread polls, ends same-host
processes that are stopped (SIGKILL: a stopped process cannot exit by itself), and every rank exits with
FAULT_EXIT_CODE. The timing arms after a few steps of this process (the first steps carry start-up work); saves and
evaluations are not timed.

A dead peer usually makes a collective fail at once (gloo: the connection closes); the loop hands that exception
to `peer_failure`, which names the lost rank the same way (one message, every rank exits).

Rank 0, the rendezvous host: under torchrun the agent (not rank 0) hosts the store, so a stopped rank 0 is found and
named like any other rank. When rank 0's own process hosts the store (plain env:// launches, the CPU demo's
spawned ranks), a stopped rank 0 also stops the store: the other ranks then see the store not answering once their
step is over its limit, print one message per host saying that the store's host (rank 0) stopped, end rank 0 when
it runs on their host, and exit.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..errors import FAULT_EXIT_CODE, FaultExit
from ..runtime.entry import report
from ..runtime.versions import applying

__all__ = ["Watchdog", "WatchdogConfig", "process_state"]


@dataclass
class WatchdogConfig:
    """The watchdog's settings."""

    step_factor: float = 5.0
    """--watchdog-step-factor: a step longer than this many times the median of the recent steps is a hang."""
    min_seconds: float = 120.0
    """--watchdog-min-seconds: no step is called hung before it has run this long."""
    interval_s: float = 1.0
    """--watchdog-interval: seconds between heartbeats and checks."""
    window: int = 20
    """Steps the median is taken over."""
    warmup_steps: int = 3
    """Steps this process times before the watchdog arms (the first ones include start-up work)."""
    timeout_minutes: Optional[int] = None
    """--distributed-timeout-minutes, for the message."""

    @property
    def confirm_s(self) -> float:
        """How long a heartbeat must stand still to count as stopped."""
        return max(3 * self.interval_s, 1.0)


def process_state(pid: int) -> str:
    """A same-host process's state letter from /proc (R, S, D, T, t, Z, ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _client(timeout_s: float):
    """A TCP client of the job's rendezvous store, or None (file stores: no watchdog)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    applying("default_store_access")
    try:
        store = c10d._get_default_store()
    except Exception:  # no default group, or a torch without the helper
        return None
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    return dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _main_thread_state(ident: int) -> Dict[str, str]:
    """Where the main thread is: inside torch.distributed (waiting on peers) or elsewhere (file:line)."""
    frame = sys._current_frames().get(ident)
    waiting, where = "", ""
    f = frame
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "/torch/distributed/" in name and f.f_code.co_name not in ("wrapper", "_fn"):
            waiting = f.f_code.co_name  # ends at the outermost call into torch.distributed
        f = f.f_back
    if frame is not None:
        where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    return {"waiting": waiting, "where": where}


class Watchdog:
    """One rank's watchdog (see the module docstring)."""

    def __init__(self, config: WatchdogConfig, client, *, prefix: str, resume: Callable[[], str]):
        import torch.distributed as dist

        self.cfg = config
        self.client = client
        self.prefix = prefix
        self.resume = resume
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.store_addr = f"{client.host}:{client.port}"
        self._main = threading.main_thread().ident
        self._durations = deque(maxlen=config.window)
        self._iteration = 0
        self._phase = "starting"
        self._t0: Optional[float] = None
        self._wall0: Optional[float] = None
        self._seq = 0
        self._stop = threading.Event()
        self._who: Dict[int, dict] = {}
        self._exiting = False
        self._lock = threading.Lock()
        self._store_ok_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="longvila-watchdog", daemon=True)
        # A store whose host is stopped may leave a store call blocked for good: a second thread, which never
        # touches the store, notices that while a step is over its limit.
        self._sentinel = threading.Thread(target=self._watch_store, name="longvila-watchdog-store", daemon=True)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @classmethod
    def start(cls, config: WatchdogConfig, *, prefix: str, resume: Callable[[], str]) -> Optional["Watchdog"]:
        client = _client(timeout_s=max(2 * config.interval_s, 2.0))
        if client is None:
            return None
        wd = cls(config, client, prefix=prefix, resume=resume)
        client.set(wd._key(f"who/{wd.rank}"), json.dumps({"host": wd.host, "pid": wd.pid}))
        wd._beat()
        wd._thread.start()
        wd._sentinel.start()
        return wd

    # -- the main thread's side --------------------------------------------------------------------------
    def begin_step(self, iteration: int) -> None:
        with self._lock:
            self._iteration, self._phase = iteration, "step"
            self._t0, self._wall0 = time.monotonic(), time.time()

    def end_step(self, iteration: int, ok: bool) -> None:
        with self._lock:
            if ok and self._t0 is not None:
                self._durations.append(time.monotonic() - self._t0)
            self._phase, self._t0 = "between steps", None

    def limit(self) -> Optional[float]:
        """The current step's limit in seconds (None before the watchdog is armed)."""
        if len(self._durations) < self.cfg.warmup_steps:
            return None
        return max(self.cfg.min_seconds, self.cfg.step_factor * statistics.median(self._durations))

    def close(self) -> None:
        self._stop.set()
        for t in (self._thread, self._sentinel):
            if t.is_alive():
                t.join(timeout=5 * self.cfg.interval_s)
        try:
            self._phase = "done"
            self._beat()
        except Exception:
            pass

    # -- the thread --------------------------------------------------------------------------------------
    def _beat(self) -> None:
        self._seq += 1
        state = _main_thread_state(self._main)
        self.client.set(self._key(f"hb/{self.rank}"), json.dumps(
            {"seq": self._seq, "it": self._iteration, "phase": self._phase, **state}))

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self._beat()
                if not self._who and self.client.check([self._key(f"who/{r}") for r in range(self.world)]):
                    self._who = self._read_who()  # cached: the store may be the thing that stops answering
                if self.client.check([self._key("abort")]):
                    self._exit()
                self._store_ok_at = time.monotonic()
                over = self._over_limit()
                if over is not None and self.client.add(self._key("report"), 1) == 1:
                    self._hang(*over)
            except Exception:  # the store did not answer: the sentinel decides
                if self._stop.is_set() or self._exiting:
                    return
                time.sleep(self.cfg.interval_s)

    def _watch_store(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            silent = time.monotonic() - self._store_ok_at
            if silent > self.cfg.confirm_s + 2 * self.cfg.interval_s and self._over_limit() is not None \
                    and not self._exiting:
                self._store_lost(TimeoutError(f"no answer for {silent:.1f} s"))

    def _over_limit(self):
        with self._lock:
            t0, it, limit = self._t0, self._iteration, self.limit()
        if t0 is None or limit is None:
            return None
        elapsed = time.monotonic() - t0
        return (it, elapsed, limit) if elapsed > limit else None

    def _exit(self) -> None:
        """Another rank reported: end this rank now (its main thread may be blocked in a collective)."""
        self._exiting = True
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)

    # -- diagnosis ---------------------------------------------------------------------------------------
    def _read_who(self) -> Dict[int, dict]:
        keys = [self._key(f"who/{r}") for r in range(self.world)]
        return {r: json.loads(v) for r, v in enumerate(self.client.multi_get(keys))}

    def _heartbeats(self) -> Dict[int, dict]:
        out = {}
        for r in range(self.world):
            key = self._key(f"hb/{r}")
            if self.client.check([key]):
                out[r] = json.loads(self.client.get(key))
        return out

    def _culprits(self, iteration: int, *, after_error: bool) -> List[str]:
        """The ranks that did not arrive at `iteration`, each with why, from two heartbeat reads."""
        if not self._who:
            try:
                self._who = self._read_who()
            except Exception:
                pass
        first = self._heartbeats()
        same_host = {r: w["pid"] for r, w in self._who.items() if w.get("host") == self.host and r != self.rank}
        # Same-host processes need no waiting: /proc says stopped or gone. Others: a heartbeat standing still.
        if not (after_error and any(process_state(p) in ("gone", "Z", "X", "T", "t") for p in same_host.values())):
            time.sleep(self.cfg.confirm_s)
        second = self._heartbeats()
        me = _main_thread_state(self._main)
        out = []
        for r in range(self.world):
            who = self._who.get(r, {})
            where = f"pid {who.get('pid', '?')} on {who.get('host', '?')}"
            if r == self.rank:
                if not me["waiting"] and not after_error:
                    out.append(f"rank {r} (this rank) is busy outside any collective at {me['where']}")
                continue
            state = process_state(same_host[r]) if r in same_host else None
            a, b = first.get(r), second.get(r)
            if state in ("gone", "Z", "X"):
                out.append(f"rank {r} is gone: its process ({where}) has exited")
            elif state in ("T", "t"):
                out.append(f"rank {r} is stopped (SIGSTOP or a debugger; {where})")
            elif b is None:
                out.append(f"rank {r} sent no heartbeat at all (it never started its watchdog, or is gone; {where})")
            elif a is not None and a["seq"] == b["seq"] and b.get("phase") != "done":
                out.append(f"rank {r} stopped answering: no heartbeat for {self.cfg.confirm_s:.0f}+ s (stopped, "
                           f"frozen or dead; {where})")
            elif b.get("phase") == "done":
                out.append(f"rank {r} has left training (it finished or failed; {where})")
            elif b["it"] < iteration or b.get("phase") != "step":
                out.append(f"rank {r} has not reached iteration {iteration}: it is at iteration {b['it']} "
                           f"({b.get('phase')}, at {b.get('where')})")
            elif not b.get("waiting"):
                out.append(f"rank {r} is busy outside any collective in iteration {iteration} at {b.get('where')}")
        return out

    def _finish(self, message: str, culprits_text: List[str]) -> None:
        """Print once, tell every rank, end stopped same-host processes."""
        report(message, since=self._wall0)
        try:
            self.client.set(self._key("abort"), message[:2000])
        except Exception:
            pass
        import signal

        for r, w in self._who.items():
            if r != self.rank and w.get("host") == self.host and process_state(w["pid"]) in ("T", "t"):
                try:
                    os.kill(w["pid"], signal.SIGKILL)  # stopped: it cannot exit by itself
                except OSError:
                    pass

    def _next_steps(self, culprits: List[str]) -> str:
        ranks = ", ".join(c.split(" ", 2)[1] for c in culprits if c.startswith("rank ")) or "the ranks named"
        return (f"Every rank exits with status {FAULT_EXIT_CODE}. Next: find out what happened to rank(s) {ranks} "
                f"(its log, its host, the kernel log for an out-of-memory kill); {self.resume()}.")

    def _hang(self, iteration: int, elapsed: float, limit: float) -> None:
        culprits = self._culprits(iteration, after_error=False)
        median = statistics.median(self._durations)
        head = (f"[watchdog] iteration {iteration} has run {elapsed:.1f} s, over its limit of {limit:.1f} s "
                f"(--watchdog-step-factor {self.cfg.step_factor:g} x the median step {median:.2f} s, at least "
                f"--watchdog-min-seconds {self.cfg.min_seconds:g}); ending the job instead of waiting out "
                f"--distributed-timeout-minutes {self.cfg.timeout_minutes}.")
        why = ("\n".join("  " + c for c in culprits) if culprits else
               "  every rank is alive and waiting inside a collective: a collective that not all ranks called, or a "
               "stalled network")
        tail = self._next_steps(culprits) + (" If steps this long are expected, raise --watchdog-step-factor or "
                                             "--watchdog-min-seconds.")
        self._finish("\n".join([head, "  did not arrive:" if culprits else "", why, tail]).replace("\n\n", "\n"),
                     culprits)
        self._exit()

    def peer_failure(self, error: BaseException, iteration: int) -> Optional[FaultExit]:
        """The main thread's collective failed: report once who was lost; every rank exits. None when no rank
        looks lost (the error is this rank's own: the caller re-raises it, traceback and all)."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        try:
            elected = self.client.add(self._key("report"), 1) == 1
        except Exception:
            return self._store_lost(error, from_main=True)
        if not elected:
            deadline = time.monotonic() + self.cfg.confirm_s + 5
            while time.monotonic() < deadline:  # let the reporter print before this rank's exit ends the job
                try:
                    if self.client.check([self._key("abort")]):
                        break
                except Exception:
                    break
                time.sleep(0.1)
            return FaultExit(first)
        culprits = self._culprits(iteration, after_error=True)
        if not culprits:
            return None
        head = (f"[watchdog] iteration {iteration}: a collective failed on rank {self.rank} "
                f"({type(error).__name__}: {first})")
        msg = "\n".join([head] + ["  " + c for c in culprits] + [self._next_steps(culprits)])
        self._finish(msg, culprits)
        return FaultExit(msg)

    def _store_lost(self, error: BaseException, from_main: bool = False):
        """The rendezvous store does not answer: its host (rank 0's process unless torchrun's agent hosts it) has
        stopped or gone. One message per host (a file lock), then exit."""
        import signal

        if self._exiting:
            return FaultExit("store lost")
        self._exiting = True
        rank0 = self._who.get(0, {})
        state = process_state(rank0["pid"]) if rank0.get("host") == self.host and self.rank != 0 else None
        detail = {"T": "stopped (SIGSTOP or a debugger)", "t": "stopped (a debugger)", "gone": "gone",
                  "Z": "gone"}.get(state, "not answering (on another host)" if state is None else f"in state {state}")
        flag = os.path.join(tempfile.gettempdir(), f"longvila-store-lost-{self.store_addr.replace(':', '_')}-"
                                                   f"{self.prefix.replace('/', '_')}")
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            first = True
        except OSError:
            first = False
        if first:
            report(f"[watchdog] iteration {self._iteration}: the job's rendezvous store at {self.store_addr} does not "
                   f"answer ({type(error).__name__}): the process hosting it stopped or is gone. Without torchrun's "
                   f"agent that is rank 0: rank 0 is {detail}. Ranks on this host ({self.host}) exit with status "
                   f"{FAULT_EXIT_CODE}. Next: find out what happened to rank 0 (its log, its host); "
                   f"{self.resume()}.", since=self._wall0)
        if state in ("T", "t"):
            try:
                os.kill(rank0["pid"], signal.SIGKILL)
            except OSError:
                pass
        if from_main:
            return FaultExit("store lost")
        self._exit()

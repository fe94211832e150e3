"""The job's monitor and hang watchdog: a rank that fails alone, or a step far longer than the recent median, ends
the job within seconds with one message naming the rank(s) and why, instead of leaving the others waiting out
--distributed-timeout-minutes.

    WatchdogConfig                      its settings (the --watchdog-* flags)
    Watchdog.start(config, prefix=, resume=) -> Watchdog | None   one per rank, right after the process group
                                        exists (before any model is built); None without a TCP store
        .arm(timing)                    the loop takes over: time steps from now on (False: --no-watchdog)
        .begin_step(iteration) / .end_step(iteration, ok)
        .peer_failure(exception, iteration) -> FaultExit           a collective failed: name the lost peer
        .post_failure(text, alike=) / .mark_printed() / .wait_printed(s) / .wait_acknowledged()
                                        run_main's side (runtime.entry.Peers)
        .close()
    Watchdog.current() -> Watchdog | None
    mark(point, micro_batch=None)       the main thread is about to enter the step's host synchronization `point`
    tick_seconds(interval, world)       the heartbeat period at a world size (the store's traffic bound)

How: every rank runs a thread that, each tick, writes a heartbeat into the job's c10d store (its own TCP connection
to the rendezvous store, so a main thread blocked in a collective does not block it): a sequence number, the
iteration, the step's last marked synchronization point, and whether the main thread is inside torch.distributed
or where it is; and reads one key, `end`, which a rank sets when the job must end (a failed rank, a hang report).

A rank that fails: runtime.entry.run_main prints the error on that rank (once from rank 0 for an error raised alike
on every rank) and posts it here: the `end` key holds its rank, error and where it was (start-up, iteration N).
Every other rank's thread reads it within a tick; one of them (an atomic counter in the store) prints one line
naming the failed rank and its error, every rank acknowledges and exits with FAULT_EXIT_CODE, and the failed rank
exits after the acknowledgements (bounded: two ticks and 5 s), so that a store its process hosts lives until then.
This runs from start-up, before the step timing arms and with --no-watchdog. For an error marked raised alike
the others first wait ALIKE_GRACE_S: their own main thread normally raises the same error and exits with it.

Hangs: the same thread times this rank's step once the loop arms it. Once a step runs longer than
max(--watchdog-min-seconds, --watchdog-step-factor x the median of the last steps), the first rank to notice
reads every rank's heartbeat twice, a few ticks apart, and names the ranks that did not arrive: a heartbeat that
stopped (a stopped, frozen or dead process; on the same host the process state says which), a rank behind the
others (an earlier iteration, or an earlier synchronization point of the step), or a rank busy outside any
collective while the others wait. It prints that once, sets `end`, ends same-host processes that are stopped
(SIGKILL: a stopped process cannot exit by itself), and every rank exits with FAULT_EXIT_CODE. The timing arms
after a few steps of this process (the first steps carry start-up work); saves and evaluations are not timed.

Synchronization points (`mark`): under gloo a waiting main thread is inside torch.distributed, which the heartbeat
sees. Under NCCL a collective returns at once and a rank waits at the next device synchronization (a `.item()`,
`.cpu()`, the optimizer's grad-norm), outside torch.distributed; so the step marks each host synchronization
before entering it (STEP_POINTS: each micro-batch's data and forward-backward, the gradient reduction, the
non-finite check, the optimizer step, the step totals) and the heartbeat carries the mark: a stalled step names
where each rank waits, whatever the backend. A mark is one attribute write.

Dead peers: under gloo a dead peer makes a collective fail at once (the connection closes); the loop hands that
exception to `peer_failure`, which names the lost rank the same way (one message, every rank exits). Under NCCL
a collective with a dead peer does not fail at once: the surviving ranks wait in their next synchronization until
NCCL's own watchdog aborts the communicator at --distributed-timeout-minutes (the process then ends with NCCL's
timeout error); before that, this watchdog names the dead rank (its heartbeat stopped) once the step is over its
limit.

Store traffic: each rank makes OPS_PER_TICK (2) store operations per tick, plus a few once per run (registering,
the first reads of who runs where); the tick is --watchdog-interval raised to keep all ranks together under
STORE_OPS_BUDGET (200) operations per second: at 1,024 ranks a tick is 10.24 s and the store sees 200 operations/s
from the watchdogs (without the bound, 2,048/s at a 1 s interval). A raised interval is announced once. A
diagnosis reads every rank's heartbeat twice (4 x world operations, once per job).

Rank 0, the rendezvous host: under torchrun the agent (not rank 0) hosts the store, so a stopped rank 0 is found and
named like any other rank. When rank 0's own process hosts the store (plain env:// launches, the CPU demo's
spawned ranks), a stopped rank 0 also stops the store: the other ranks then see the store not answering once their
step is over its limit, print one message per host saying that the store's host (rank 0) stopped, end rank 0 when
it runs on their host, and exit.
"""

from __future__ import annotations

import dataclasses
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
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import FAULT_EXIT_CODE, FaultExit
from ..runtime.entry import once, report, set_peers
from ..runtime.versions import applying

__all__ = ["Watchdog", "WatchdogConfig", "process_state", "mark", "tick_seconds", "STEP_POINTS", "STORE_OPS_BUDGET",
           "OPS_PER_TICK", "ALIKE_GRACE_S"]

STORE_OPS_BUDGET = 200.0
"""Store operations per second that all ranks' watchdog threads together stay under (a TCPStore serves tens of
thousands; the bound keeps the watchdog a small share of it at any world size)."""

OPS_PER_TICK = 2
"""Store operations of one rank's thread per tick: its heartbeat (set) and the `end` key (check)."""

ALIKE_GRACE_S = 5.0
"""How long a rank that sees a peer's error marked raised alike waits for its own main thread to raise it too."""

STEP_POINTS = ("data", "forward-backward", "gradient reduction", "non-finite check", "optimizer step", "step totals")
"""The step's host synchronization points, in the order a step enters them (`data` and `forward-backward` once per
micro-batch, inside Megatron's schedule)."""

_SCHEDULE_POINTS = ("data", "forward-backward")


def tick_seconds(interval_s: float, world: int) -> float:
    """Seconds between heartbeats: --watchdog-interval, raised so that `world` ranks make at most STORE_OPS_BUDGET
    store operations per second together."""
    return max(float(interval_s), OPS_PER_TICK * world / STORE_OPS_BUDGET)


@dataclass
class WatchdogConfig:
    """The watchdog's settings."""

    step_factor: float = 5.0
    """--watchdog-step-factor: a step longer than this many times the median of the recent steps is a hang."""
    min_seconds: float = 120.0
    """--watchdog-min-seconds: no step is called hung before it has run this long."""
    interval_s: float = 1.0
    """--watchdog-interval: seconds between heartbeats and checks (raised at large world sizes: tick_seconds)."""
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


def _progress(beat: dict) -> Tuple[int, int]:
    """How far a rank is in its step, comparable across ranks: (iteration, point). Megatron's schedule counts as
    one point: its pipeline stages are legitimately at different micro-batches."""
    point = beat.get("at") or ""
    if point in _SCHEDULE_POINTS:
        return int(beat.get("it", 0)), 0
    return int(beat.get("it", 0)), (STEP_POINTS.index(point) if point in STEP_POINTS else -1)


def _point_text(beat: dict) -> str:
    point = beat.get("at")
    if not point:
        return f"iteration {beat.get('it')}, {beat.get('phase')}"
    mb = f" of micro-batch {beat.get('mb')}" if point in _SCHEDULE_POINTS else ""
    return f"iteration {beat.get('it')}, {point}{mb}"


_CURRENT: list = [None]


def mark(point: str, micro_batch: Optional[int] = None) -> None:
    """The main thread is about to enter the host synchronization `point` (one of STEP_POINTS) of its step."""
    wd = _CURRENT[0]
    if wd is not None:
        wd._at, wd._mb = point, micro_batch


class Watchdog:
    """One rank's monitor and watchdog (see the module docstring)."""

    def __init__(self, config: WatchdogConfig, client, *, prefix: str, resume: Callable[[], str]):
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.requested_interval_s = config.interval_s
        self.cfg = dataclasses.replace(config, interval_s=tick_seconds(config.interval_s, self.world))
        self.client = client
        self.prefix = prefix
        self.resume = resume
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.store_addr = f"{client.host}:{client.port}"
        self._main = threading.main_thread().ident
        self._durations = deque(maxlen=config.window)
        self._iteration = 0
        self._phase = "starting"
        self._at: Optional[str] = None
        self._mb: Optional[int] = None
        self._timing = False
        self._t0: Optional[float] = None
        self._wall0: Optional[float] = None
        self._seq = 0
        self._stop = threading.Event()
        self._who: Dict[int, dict] = {}
        self._exiting = False
        self._posted = False
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
        world_interval = tick_seconds(config.interval_s, _world())
        client = _client(timeout_s=max(2 * world_interval, 2.0))
        if client is None:
            return None
        wd = cls(config, client, prefix=prefix, resume=resume)
        if wd.cfg.interval_s > config.interval_s:
            once(f"[watchdog] heartbeat every {wd.cfg.interval_s:.2f} s, not --watchdog-interval "
                 f"{config.interval_s:g}: {wd.world} ranks stay under {STORE_OPS_BUDGET:.0f} store operations/s "
                 f"together")
        client.set(wd._key(f"who/{wd.rank}"), json.dumps({"host": wd.host, "pid": wd.pid}))
        wd._beat()
        wd._thread.start()
        wd._sentinel.start()
        _CURRENT[0] = wd
        set_peers(wd)
        return wd

    @staticmethod
    def current() -> Optional["Watchdog"]:
        """The watchdog this process started (None before the process group exists, or after close)."""
        return _CURRENT[0]

    # -- the main thread's side --------------------------------------------------------------------------
    def arm(self, timing: bool) -> None:
        """The training loop runs from now on: time its steps (unless `timing` is False: --no-watchdog)."""
        with self._lock:
            self._timing = timing
            self._phase = "between steps"

    def begin_step(self, iteration: int) -> None:
        with self._lock:
            self._iteration, self._phase, self._at, self._mb = iteration, "step", None, None
            self._t0, self._wall0 = time.monotonic(), time.time()

    def end_step(self, iteration: int, ok: bool) -> None:
        with self._lock:
            if ok and self._t0 is not None:
                self._durations.append(time.monotonic() - self._t0)
            self._phase, self._t0, self._at, self._mb = "between steps", None, None, None

    def limit(self) -> Optional[float]:
        """The current step's limit in seconds (None before the watchdog is armed)."""
        if not self._timing or len(self._durations) < self.cfg.warmup_steps:
            return None
        return max(self.cfg.min_seconds, self.cfg.step_factor * statistics.median(self._durations))

    def close(self) -> None:
        self._stop.set()
        if _CURRENT[0] is self:
            _CURRENT[0] = None
            set_peers(None)
        for t in (self._thread, self._sentinel):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=5 * self.cfg.interval_s)
        try:
            self._phase = "done"
            self._beat()
        except Exception:
            pass

    # -- run_main's side (runtime.entry.Peers) ----------------------------------------------------------
    def _where_now(self) -> str:
        if self._phase == "starting":
            return "at start-up"
        if self._phase == "step":
            return f"in iteration {self._iteration}" + (f" ({self._at})" if self._at else "")
        if self._phase == "between steps" and self._iteration:
            return f"after iteration {self._iteration}"
        return "before the first step"

    def post_failure(self, text: str, *, alike: bool) -> None:
        """This rank failed with `text`: tell every rank (the first failure sets `end`)."""
        if self._posted:
            return
        self._posted = True
        self._stop.set()  # this thread no longer polls: the main thread exits after this call
        try:
            if self.client.add(self._key("end_claim"), 1) == 1:
                self.client.set(self._key("end"), json.dumps(
                    {"kind": "failed", "rank": self.rank, "error": text[:2000], "alike": alike,
                     "where": self._where_now(), "host": self.host, "time": time.time()}))
            self._count_in("failed", "acks")
        except Exception:  # the store is gone: exit all the same
            pass

    def mark_printed(self) -> None:
        try:
            self.client.set(self._key("alike_printed"), "1")
        except Exception:
            pass

    def wait_printed(self, timeout_s: float) -> bool:
        return self._poll("alike_printed", timeout_s)

    def wait_acknowledged(self) -> None:
        """Until every rank failed or acknowledged a failure, at most two ticks and 5 s (a rank that never
        acknowledges -- gone, stopped, finished -- does not hold this one longer)."""
        self._poll("all_acked", 2 * self.cfg.interval_s + 5)

    def _poll(self, name: str, timeout_s: float) -> bool:
        """Whether key `name` exists, checking every 0.1 s for up to `timeout_s` (a store wait that times out
        prints c10d's warnings; these waits are short and end this process)."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.client.check([self._key(name)]):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
            return True
        except Exception:  # the store is gone
            return False

    # -- the thread --------------------------------------------------------------------------------------
    def _beat(self) -> None:
        self._seq += 1
        state = _main_thread_state(self._main)
        self.client.set(self._key(f"hb/{self.rank}"), json.dumps(
            {"seq": self._seq, "it": self._iteration, "phase": self._phase, "at": self._at, "mb": self._mb,
             **state}))

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self._tick()
            except Exception:  # the store did not answer: the sentinel decides
                if self._stop.is_set() or self._exiting:
                    return
                time.sleep(self.cfg.interval_s)

    def _tick(self) -> None:
        """One tick: OPS_PER_TICK store operations once the ranks' registrations are read (a few ticks at start)."""
        self._beat()
        if not self._who and self.client.check([self._key(f"who/{r}") for r in range(self.world)]):
            self._who = self._read_who()  # cached: the store may be the thing that stops answering
        if self.client.check([self._key("end")]):
            self._ended(json.loads(self.client.get(self._key("end"))))
        self._store_ok_at = time.monotonic()
        over = self._over_limit()
        if over is not None and self.client.add(self._key("report"), 1) == 1:
            self._hang(*over)

    def _ended(self, end: dict) -> None:
        """Another rank set `end`: a hang report (printed already), or a failed rank (printed here, once)."""
        if end.get("kind") != "failed":
            self._exit()
        if end["rank"] == self.rank or self._posted:
            return  # this rank's own failure: its main thread is exiting
        if end.get("alike"):
            # Raised alike: this rank's own main thread normally raises it too, and exits with it.
            if self._stop.wait(ALIKE_GRACE_S):
                return
        if self.client.add(self._key("report"), 1) == 1:
            alike = " (an error marked raised alike on every rank, which this rank did not raise)" \
                if end.get("alike") else ""
            report(f"[monitor] rank {end['rank']} failed {end.get('where', '')} on {end.get('host', '?')}: "
                   f"{end['error']}{alike}. Ending the job: every other rank exits with status {FAULT_EXIT_CODE}. "
                   f"Next: see rank {end['rank']}'s own message above (or its log); {self.resume()}.",
                   since=end.get("time"))
        self._count_in("acks", "failed")
        if self._hosts_store():  # the others read the store until they have seen the failure
            self.wait_acknowledged()
            time.sleep(0.5)  # the failed rank polls `all_acked` every 0.1 s: it sees it before the store goes
        self._exit()

    def _count_in(self, mine: str, other: str) -> None:
        """Count this rank as failed or acknowledging; whoever completes the world sets `all_acked` (each adds to
        its own counter, then reads the other: the last to add sees both complete)."""
        if self.client.add(self._key(mine), 1) + self.client.add(self._key(other), 0) >= self.world:
            self.client.set(self._key("all_acked"), "1")

    def _hosts_store(self) -> bool:
        """Whether this process hosts the rendezvous store: rank 0 without torchrun's agent store."""
        return self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"

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
        me = {"seq": 0, "it": self._iteration, "phase": self._phase, "at": self._at, "mb": self._mb,
              **_main_thread_state(self._main)}
        second[self.rank] = me
        # The ranks still in this step, and the furthest synchronization point any of them reached: a rank behind
        # it has not arrived where the others wait (gloo or NCCL alike).
        live = {r: b for r, b in second.items() if b.get("phase") == "step" and b.get("it") == iteration}
        front = max((_progress(b) for b in live.values()), default=None)
        front_beat = next((b for b in live.values() if _progress(b) == front), None)
        others_wait = any(b.get("waiting") for r, b in live.items() if r != self.rank)
        out = []
        for r in range(self.world):
            who = self._who.get(r, {})
            where = f"pid {who.get('pid', '?')} on {who.get('host', '?')}"
            b = second.get(r)
            if r == self.rank:
                if after_error:
                    continue
                if front is not None and _progress(me) < front:
                    out.append(f"rank {r} (this rank) has not reached {_point_text(front_beat)}: it is at "
                               f"{_point_text(me)} ({me['where']})")
                elif not me["waiting"] and others_wait:
                    out.append(f"rank {r} (this rank) is busy outside any collective at {me['where']}")
                continue
            state = process_state(same_host[r]) if r in same_host else None
            a = first.get(r)
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
            elif front is not None and _progress(b) < front:
                out.append(f"rank {r} has not reached {_point_text(front_beat)}: it is at {_point_text(b)} "
                           f"({'waiting in ' + b['waiting'] if b.get('waiting') else 'at ' + str(b.get('where'))})")
            elif not b.get("waiting") and others_wait:
                out.append(f"rank {r} is busy outside any collective in iteration {iteration} at {b.get('where')}")
        return out

    def _positions(self) -> str:
        """Where each rank's step is, grouped (for a hang with no rank behind)."""
        try:
            beats = self._heartbeats()
        except Exception:
            return ""
        groups: Dict[str, List[int]] = {}
        for r, b in sorted(beats.items()):
            groups.setdefault(_point_text(b), []).append(r)
        return "; ".join(f"rank(s) {', '.join(map(str, rs))} at {p}" for p, rs in groups.items())

    def _finish(self, message: str, culprits_text: List[str]) -> None:
        """Print once, tell every rank, end stopped same-host processes."""
        report(message, since=self._wall0)
        try:
            if self.client.add(self._key("end_claim"), 1) == 1:
                self.client.set(self._key("end"), json.dumps({"kind": "abort", "rank": self.rank}))
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
        positions = self._positions()
        why = ("\n".join("  " + c for c in culprits) if culprits else
               "  every rank is alive and waiting at the same point: a collective that not all ranks called, or a "
               "stalled network or device" + (f" ({positions})" if positions else ""))
        tail = self._next_steps(culprits) + (" If steps this long are expected, raise --watchdog-step-factor or "
                                             "--watchdog-min-seconds.")
        self._finish("\n".join([head, "  did not arrive:" if culprits else "", why, tail]).replace("\n\n", "\n"),
                     culprits)
        self._exit()

    def _posted_failure(self) -> Optional[dict]:
        """The failure another rank posted, if any (its error explains a collective that failed here)."""
        try:
            if self.client.check([self._key("end")]):
                end = json.loads(self.client.get(self._key("end")))
                return end if end.get("kind") == "failed" and end.get("rank") != self.rank else None
        except Exception:
            pass
        return None

    def peer_failure(self, error: BaseException, iteration: int) -> Optional[FaultExit]:
        """The main thread's collective failed: report once who was lost; every rank exits. None when no rank
        looks lost (the error is this rank's own: the caller re-raises it, traceback and all)."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        posted = self._posted_failure()
        if posted is not None:  # a peer failed with an error and said so: the monitor thread reports that
            self._stop.wait(2 * self.cfg.interval_s + 5)
            return FaultExit(f"rank {posted['rank']} failed: {posted.get('error')}")
        try:
            elected = self.client.add(self._key("report"), 1) == 1
        except Exception:
            return self._store_lost(error, from_main=True)
        if not elected:
            deadline = time.monotonic() + self.cfg.confirm_s + 5
            while time.monotonic() < deadline:  # let the reporter print before this rank's exit ends the job
                try:
                    if self.client.check([self._key("end")]):
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


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()

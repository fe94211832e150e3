"""Run a function on N local gloo ranks: the multi-process launcher of the tools, demos, inference and tests.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initializes a gloo process group
in each, calls `fn(rank, world_size, *args)` and returns the list of per-rank return values. Any rank's
exception fails the whole call with that rank's traceback; a run that exceeds `timeout` is killed and
raises instead of hanging. `fn` must be importable by name (a module-level function).

Nothing a call starts outlives it: each rank leads a process group of its own (its forked helpers stay in it) and
carries the call's mark (runtime.processes) in its environment, inherited by whatever it starts (a torchrun's
workers in their own sessions too); when the call ends, each rank's group and every process still carrying the mark
is killed. `stop_helpers()` ends the start server of the ranks and multiprocessing's resource tracker, which
otherwise live until this process exits (for a caller that checks that nothing it started is left, the test run).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import platform
import queue
import signal
import tempfile
import time
import traceback
from multiprocessing import forkserver, resource_tracker
from typing import Any, Callable, List

from ..errors import DistributedRunError
from ..runtime import processes
from ..runtime.versions import applying

__all__ = ["run_distributed", "DistributedRunError", "stop_helpers"]


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, kwargs: dict,
            results: "mp.Queue", threads: int, mark: str) -> None:
    # A group of its own, so the launcher can end this rank's forked helpers with it; the mark for the others.
    os.setpgid(0, 0)
    os.environ.update(processes.with_mark(os.environ, mark))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            try:
                out = fn(rank, world_size, *args, **kwargs)
            except BaseException:
                # Reported before the barrier below: peers stuck in a collective with this rank would hold it there.
                results.put((rank, "error", traceback.format_exc()))
                return
            results.put((rank, "ok", out))
        finally:
            try:
                dist.barrier()
            except Exception:  # a peer may already be gone; its own error is reported
                pass
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))


_CTX = None


def _context():
    """A forkserver that has imported torch (and megatron.core, if present) once: each rank then starts by
    a cheap fork instead of re-importing them, which dominates multi-rank test time on small machines.
    The server has run no computation, so no thread pools exist yet to be broken by the fork."""
    global _CTX
    if _CTX is None:
        method = os.environ.get("MEGATRON_LONGVILA_START_METHOD", "forkserver")
        ctx = mp.get_context(method)
        if method == "forkserver":
            # The filters of runtime.quiet first: the server imports megatron.core, whose import-time warnings
            # would otherwise print once per test run.
            preload = ["megatron_longvila.runtime.quiet", "torch", "torch.distributed"]
            try:
                import importlib.util

                if importlib.util.find_spec("megatron.core") is not None:
                    preload.append("megatron.core")
            except (ImportError, ValueError):
                pass
            ctx.set_forkserver_preload(preload)
        _CTX = ctx
    return _CTX


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, threads: int = 1,
                    **kwargs: Any) -> List[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return per-rank results."""
    ctx = _context()
    results = ctx.Queue()
    mark = processes.new_mark()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        # Not daemonic: megatron-core's checkpoint writer starts child processes, which daemons may not. The
        # finally-block below kills every rank that is still alive and everything the ranks started, so nothing
        # outlives the call.
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, kwargs, results, threads,
                                                   mark), daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        outputs: dict = {}
        errors: dict = {}
        failed = False
        deadline = time.monotonic() + timeout
        try:
            while len(outputs) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failed = True
                    raise DistributedRunError(
                        f"timed out after {timeout:.0f}s; ranks finished: {sorted(outputs)}, failed: {sorted(errors)}")
                try:
                    rank, status, payload = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if not p.is_alive() and p.exitcode not in (0, None) and r not in outputs and r not in errors]
                    if dead:
                        # Give a crashing rank's own report a moment to arrive before blaming the process.
                        time.sleep(0.5)
                        while not results.empty():
                            rank, status, payload = results.get()
                            (outputs if status == "ok" else errors)[rank] = payload
                        dead = [r for r in dead if r not in outputs and r not in errors]
                        if dead:
                            failed = True
                            raise DistributedRunError(
                                f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                    continue
                if status == "ok":
                    outputs[rank] = payload
                else:
                    errors[rank] = payload
                    break  # one failure is enough; the peers may now hang in a collective
            if errors:
                rank = min(errors)
                raise DistributedRunError(f"rank {rank} of {world_size} raised:\n{errors[rank]}")
        finally:
            for p in procs:
                # Ranks that finished exit promptly; after a failure the others may be stuck in a collective.
                p.join(timeout=0.1 if (errors or failed) else 5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            _reap(procs, mark)
    return [outputs[r] for r in range(world_size)]


def _reap(procs: list, mark: str) -> None:
    """End what the ranks started and left: a rank killed above leaves its helpers running (megatron-core's
    checkpoint writer serves a multiprocessing Manager that never notices its parent's death)."""
    for p in procs:
        if p.pid is None:
            continue
        try:
            # The group outlives its leader while a member lives, and its id is not reused meanwhile.
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no member left
            pass
    processes.end(processes.marked(mark))


def stop_helpers(wait: float = 10.0) -> None:
    """End this process's start server and multiprocessing's resource tracker (they otherwise end only when this
    process exits); the next `run_distributed` starts new ones. Call it when no rank is running."""
    server = forkserver._forkserver
    with server._lock:
        if server._forkserver_pid is not None:
            applying("mp_helpers_stop", version=platform.python_version())
            # Killed, not asked: it would wait for every holder of its "alive" pipe, the ranks' helpers included.
            os.kill(server._forkserver_pid, signal.SIGKILL)
            server._stop_unlocked()
    # Past calls' queues no longer referenced (a failed call's traceback cycle) unlink their semaphores now; the
    # tracker would unlink them at its exit, and their finalizers would then fail.
    gc.collect()
    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._pid is not None:
            applying("mp_helpers_stop", version=platform.python_version())
            # Closing its pipe ends it once no other process holds the pipe (it ignores SIGINT and SIGTERM).
            os.close(tracker._fd)
            pid, tracker._fd, tracker._pid = tracker._pid, None, None
            deadline = time.monotonic() + wait
            while _running_child(pid):
                if time.monotonic() > deadline:  # a leftover holds it; the caller's check names both
                    break
                time.sleep(0.02)


def _running_child(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # reaped already
        return False

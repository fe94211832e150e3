"""Run a function on N local gloo ranks: the multi-process launcher of the tools, demos, inference and tests.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initializes a gloo process group
in each, calls `fn(rank, world_size, *args)` and returns the list of per-rank return values. Any rank's
exception fails the whole call with that rank's traceback; a run that exceeds `timeout` is killed and
raises instead of hanging. `fn` must be importable by name (a module-level function).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, List

from ..errors import DistributedRunError

__all__ = ["run_distributed", "DistributedRunError"]


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, kwargs: dict,
            results: "mp.Queue", threads: int) -> None:
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
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        # Not daemonic: megatron-core's checkpoint writer starts child processes, which daemons may not. The
        # finally-block below kills every rank that is still alive, so none outlives the call.
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, kwargs, results, threads),
                             daemon=False) for r in range(world_size)]
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
    return [outputs[r] for r in range(world_size)]

"""Faults in long runs: non-finite steps, hung or dead ranks, failed saves -- each ends or recovers with one message.

    add_fault_args(parser) / check_fault_args(args)   the flags (Megatron's names where Megatron has them)
    start_monitor(args) -> Watchdog | None            every rank, right after the process group exists: a rank
                                    that fails from then on (start-up included) ends the job promptly (watchdog.py)
    FaultGuard(args, ddp=, config=)                   what the project's loop runs each step through:
        .step(iteration)            context: times the step for the watchdog; a collective that fails because a
                                    peer died becomes one message naming that peer
        .watch(iterator)            records each micro-batch's sample ids (for the messages) and marks its
                                    data and forward-backward synchronization points for the watchdog
        .mark(point)                the loop is about to enter a host synchronization (watchdog.STEP_POINTS)
        .wrap_forward_step(fn)      test injection only (see INJECT_ENV); returns fn itself otherwise
        .optimizer_step(optimizer, store) -> (stepped, grad_norm)   the NaN/Inf check and skip policy
        .saving(iteration)          context around a save: a failed save ends the run with its one message
        .close()
    FaultExit                       SystemExit of every rank after a fault was reported (status FAULT_EXIT_CODE;
                                    both in megatron_longvila.errors)
    report(message, since=None)     print a fault message once (the caller is the rank that knows it;
                                    runtime.entry.report)
    INJECT_ENV                      the test-only fault injection variable

Non-finite losses and gradients (Megatron's --check-for-nan-in-loss-and-grad, on by default): after the
schedule, each rank checks its micro-batches' loss reports and, before the data-parallel reduction, its own
gradient buffers (one sum per buffer, on the device); the step's flags are all-reduced once over the world (two
numbers). A non-finite step is reported once, with the iteration, the rank(s), the micro-batch and its sample ids;
it is skipped -- no optimizer step, optimizer state and learning-rate schedule untouched, the micro-batches not
retried -- while the run's count of skipped steps (kept in every checkpoint) stays within
--max-skipped-nonfinite-steps (default 0: the first one stops the run). Past it the run stops; the last good
checkpoint is the resume point.

Test-only fault injection: INJECT_ENV holds comma-separated `kind@iteration:rank=R[:mb=M][:bytes=B]` items:
    nan_loss   micro-batch M's loss on rank R (and so its gradients) becomes NaN
    nan_grad   one gradient element on rank R becomes NaN before the data-parallel reduction
    sigstop    rank R stops itself (SIGSTOP) in micro-batch M's loss function, mid-step
    sigkill    rank R kills itself (SIGKILL) there
    fsize      rank R saves this iteration under RLIMIT_FSIZE = B bytes with SIGXFSZ ignored (a real write error)
    startup    rank R raises InjectedFault at start-up, once its monitor runs and before any model is built
               (the iteration is ignored: `startup@0:rank=R`)
Production code reads the variable once per run; with it unset nothing is wrapped and nothing is checked per step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

from ..checkpoint.layout import read_tracker
from ..errors import ArgumentError, CheckpointError, FaultExit, RaisedLocally, SaveFailed
from ..runtime.entry import report, run_prefix
from .watchdog import Watchdog, WatchdogConfig, mark

__all__ = ["FaultGuard", "add_fault_args", "check_fault_args", "INJECT_ENV", "Injection", "injections_from_env",
           "is_peer_failure", "resume_hint", "start_monitor", "InjectedFault"]

INJECT_ENV = "MEGATRON_LONGVILA_INJECT_FAULT"
"""Test-only: faults to inject (see the module docstring)."""


def resume_hint(save_dir: Optional[str]) -> str:
    """Where a stopped run resumes from, in words."""
    if not save_dir:
        return "this run saves no checkpoints (no --save): it restarts from the beginning"
    try:
        it = read_tracker(save_dir)
    except CheckpointError:
        it = None
    if it is None:
        return f"no checkpoint was committed in {save_dir} yet: the run restarts from the beginning"
    return f"resume with --load {save_dir} (its latest checkpoint: iteration {it})"


# ------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------

def add_fault_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("faults")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="Megatron's: timeout of every process group (the default group, Megatron's, the project's); "
                        "a collective waiting longer fails")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="Megatron's: check every step's losses and gradients for NaN/Inf (default on)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="Megatron's: turn the check off")
    g.add_argument("--max-skipped-nonfinite-steps", type=int, default=0,
                   help="skip up to this many steps with a non-finite loss or gradient over the run (optimizer "
                        "untouched; counted in the checkpoint); past it, or at 0, such a step stops the run")
    g.add_argument("--no-watchdog", dest="watchdog", action="store_false",
                   help="no hang watchdog (a stopped rank then holds the job for --distributed-timeout-minutes)")
    g.add_argument("--watchdog-step-factor", type=float, default=5.0,
                   help="a step running longer than this many times the median of the recent steps is a hang")
    g.add_argument("--watchdog-min-seconds", type=float, default=120.0,
                   help="never call a step hung before it has run this long")
    g.add_argument("--watchdog-interval", type=float, default=1.0,
                   help="seconds between heartbeats (and checks) of every rank's watchdog thread")
    g.add_argument("--save-retain", type=int, default=None,
                   help="keep only the newest N committed checkpoints under --save (default: keep all)")
    g.add_argument("--ckpt-load-newest-valid", action="store_true",
                   help="when the latest checkpoint under --load fails verification, load the newest one that passes "
                        "instead of refusing")
    g.add_argument("--no-ckpt-verify-checksums", dest="ckpt_verify_checksums", action="store_false",
                   help="on load, check only the manifest's file sizes (no checksums)")
    return p


def check_fault_args(a: argparse.Namespace) -> None:
    if a.distributed_timeout_minutes < 1:
        raise ArgumentError(f"--distributed-timeout-minutes {a.distributed_timeout_minutes}: give at least 1")
    if a.max_skipped_nonfinite_steps < 0:
        raise ArgumentError(f"--max-skipped-nonfinite-steps {a.max_skipped_nonfinite_steps}: give 0 (stop at the "
                            f"first non-finite step) or more")
    if a.max_skipped_nonfinite_steps and not a.check_for_nan_in_loss_and_grad:
        raise ArgumentError("--max-skipped-nonfinite-steps needs the NaN check: drop "
                            "--no-check-for-nan-in-loss-and-grad")
    if a.watchdog_step_factor <= 1 or a.watchdog_min_seconds <= 0 or a.watchdog_interval <= 0:
        raise ArgumentError("--watchdog-step-factor must be > 1, --watchdog-min-seconds and --watchdog-interval > 0 "
                            "(or give --no-watchdog)")
    if a.watchdog and a.watchdog_min_seconds < 3 * a.watchdog_interval:
        raise ArgumentError(f"--watchdog-min-seconds {a.watchdog_min_seconds} is under 3 heartbeats of "
                            f"--watchdog-interval {a.watchdog_interval}: raise it or lower the interval")
    if a.save_retain is not None and a.save_retain < 1:
        raise ArgumentError(f"--save-retain {a.save_retain}: keep at least 1 checkpoint (or drop the flag to keep "
                            f"all)")


# ------------------------------------------------------------------------------------------------------
# Test-only injection
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Injection:
    """One injected fault (INJECT_ENV)."""

    kind: str
    """nan_loss, nan_grad, sigstop, sigkill or fsize."""
    iteration: int
    """The iteration (1-based) it happens in."""
    rank: int
    """The global rank it happens on."""
    microbatch: int = 0
    """nan_loss, sigstop, sigkill: the micro-batch (0-based, in the order this rank's schedule runs them)."""
    nbytes: int = 0
    """fsize: the file-size limit in bytes."""


KINDS = ("nan_loss", "nan_grad", "sigstop", "sigkill", "fsize", "startup")


class InjectedFault(RaisedLocally, RuntimeError):
    """Test-only: the error INJECT_ENV's `startup` kind raises on one rank (a local error, as one rank's unreadable
    file would be)."""


def injections_from_env() -> List[Injection]:
    spec = os.environ.get(INJECT_ENV, "").strip()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            head, *opts = item.split(":")
            kind, it = head.split("@")
            kv = dict(o.split("=", 1) for o in opts)
            inj = Injection(kind=kind, iteration=int(it), rank=int(kv.get("rank", 0)),
                            microbatch=int(kv.get("mb", 0)), nbytes=int(kv.get("bytes", 0)))
        except ValueError:
            raise ValueError(f"{INJECT_ENV}={spec!r}: {item!r} is not kind@iteration:rank=R[:mb=M][:bytes=B]") from None
        if inj.kind not in KINDS:
            raise ValueError(f"{INJECT_ENV}: unknown fault {inj.kind!r} (one of {', '.join(KINDS)})")
        out.append(inj)
    return out


# ------------------------------------------------------------------------------------------------------
# Errors of collectives whose peer is gone
# ------------------------------------------------------------------------------------------------------

_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
               "gloo", "nccl", "socket", "unexpected eof")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception is a collective or store failing (a peer died, stopped, or never arrived)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _PEER_WORDS)


# ------------------------------------------------------------------------------------------------------
# The loop's guard
# ------------------------------------------------------------------------------------------------------

class _Recording:
    """Passes the schedule's micro-batches through, noting each one's sample ids (when `sink` is a list) and marking
    the data wait and the forward-backward that follows it for the watchdog."""

    def __init__(self, it: Iterator, sink: Optional[list]):
        self.it = it
        self.sink = sink
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        mark("data", self.index)  # the step's data: decoding and the replica's host agreement on it
        item = next(self.it)
        mark("forward-backward", self.index)
        self.index += 1
        if self.sink is not None:
            batch = getattr(item, "batch", item)
            self.sink.append(list(getattr(batch, "sample_ids", None) or []))
        return item


_SESSIONS = [0]  # pretrain calls in this process (the same count on every rank): store keys per run


def _watchdog_config(args) -> WatchdogConfig:
    return WatchdogConfig(step_factor=args.watchdog_step_factor, min_seconds=args.watchdog_min_seconds,
                          interval_s=args.watchdog_interval,
                          timeout_minutes=getattr(args, "distributed_timeout_minutes", None))


def _start_watchdog(args) -> Optional[Watchdog]:
    _SESSIONS[0] += 1
    return Watchdog.start(_watchdog_config(args), prefix=f"{run_prefix()}/wd/{_SESSIONS[0]}",
                          resume=lambda: resume_hint(args.save or args.load))


def start_monitor(args) -> Optional[Watchdog]:
    """Every rank, right after the process group exists (before the arguments' full check and any model): the
    monitor that ends the job when one rank fails (its fault flags checked first, alike on every rank). None for
    one rank, or without a TCP rendezvous store. Then this rank's injected start-up fault, if any (tests)."""
    import torch.distributed as dist

    check_fault_args(args)
    current = Watchdog.current()
    if current is not None:  # an earlier run in this process that did not end cleanly
        current.close()
    wd = _start_watchdog(args) if dist.get_world_size() > 1 else None
    me = dist.get_rank()
    if any(i.kind == "startup" and i.rank == me for i in injections_from_env()):
        raise InjectedFault(f"rank {me}: start-up fault injected by {INJECT_ENV} (test-only)")
    return wd


class FaultGuard:
    """The fault handling of one training run (see the module docstring). Every rank builds one."""

    def __init__(self, args, *, ddp, config):
        import torch.distributed as dist

        self.args = args
        self.ddp = ddp
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.check = bool(getattr(args, "check_for_nan_in_loss_and_grad", True))
        self.max_skipped = int(getattr(args, "max_skipped_nonfinite_steps", 0) or 0)
        self.skipped = 0
        """Steps skipped as non-finite over the whole run (restored from the checkpoint on resume)."""
        self.injections = [i for i in injections_from_env() if i.rank == self.rank]
        self.iteration = 0  # the step in progress (0 between steps)
        self._step_started = None
        self._samples: List[list] = []
        self._forwards = 0
        self._grad_flag = None
        # The monitor started at start-up (start_monitor); started here for callers that did not.
        self.watchdog = Watchdog.current()
        if self.watchdog is None and self.world > 1:
            self.watchdog = _start_watchdog(args)
        if self.watchdog is not None:
            self.watchdog.arm(timing=bool(getattr(args, "watchdog", True)))
        if self.check or self._injected("nan_grad") or self.watchdog is not None:
            self._wrap_finalize(config)

    # -- injection -------------------------------------------------------------------------------------
    def _injected(self, kind: str, iteration: Optional[int] = None, microbatch: Optional[int] = None):
        for inj in self.injections:
            if inj.kind == kind and (iteration is None or inj.iteration == iteration) \
                    and (microbatch is None or inj.microbatch == microbatch):
                return inj
        return None

    def wrap_forward_step(self, fn: Callable) -> Callable:
        """The forward step, with this rank's injected loss faults (only when INJECT_ENV names some)."""
        if not any(i.kind in ("nan_loss", "sigstop", "sigkill") for i in self.injections):
            return fn

        def forward_step(data_iterator, model):
            output, loss_func = fn(data_iterator, model)
            index = self._forwards
            self._forwards += 1
            kinds = [k for k in ("nan_loss", "sigstop", "sigkill") if self.iteration and
                     self._injected(k, self.iteration, index)]
            if not kinds:
                return output, loss_func

            def injected(output_tensor):
                if "sigkill" in kinds:
                    os.kill(os.getpid(), signal.SIGKILL)
                if "sigstop" in kinds:
                    os.kill(os.getpid(), signal.SIGSTOP)
                loss, count, rep = loss_func(output_tensor)
                if "nan_loss" in kinds:
                    loss = loss * float("nan")  # a NaN loss poisons the backward too, as a real one does
                    rep = {k: v.clone() for k, v in rep.items()}
                    for v in rep.values():
                        v[0] = float("nan")
                return loss, count, rep

            return output, injected

        return forward_step

    # -- the gradient check (before the data-parallel reduction) ---------------------------------------
    def _wrap_finalize(self, config) -> None:
        import torch

        original = config.finalize_model_grads_func

        def finalize_model_grads(model, *a, **k):
            buffers = [b for chunk in model for b in
                       list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))]
            inj = self._injected("nan_grad", self.iteration)
            if inj is not None and buffers:
                buffers[0].grad_data.view(-1)[0] = float("nan")
            mark("gradient reduction")
            if self.check and buffers:
                # One sum per buffer, on the device (no host sync here): NaN and Inf survive a sum. This rank's
                # own gradients, before the reduction spreads a non-finite value to every data-parallel peer.
                self._grad_flag = torch.stack([(~torch.isfinite(b.grad_data.sum())).float() for b in buffers]).sum()
            return original(model, *a, **k)

        config.finalize_model_grads_func = finalize_model_grads

    # -- the step ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, iteration: int):
        self.iteration = iteration
        self._step_started = time.time()
        self._samples.clear()
        self._forwards = 0
        self._grad_flag = None
        if self.watchdog is not None:
            self.watchdog.begin_step(iteration)
        ok = False
        try:
            yield
            ok = True
        except FaultExit:
            raise
        except Exception as e:
            if self.watchdog is not None and is_peer_failure(e):
                lost = self.watchdog.peer_failure(e, iteration)
                if lost is not None:
                    raise lost from None
            raise
        finally:
            if self.watchdog is not None:
                self.watchdog.end_step(iteration, ok)
            self.iteration = 0

    def watch(self, iterator):
        if not self.check and self.watchdog is None:
            return iterator
        return _Recording(iterator, self._samples if self.check else None)

    def mark(self, point: str) -> None:
        """The loop is about to enter the host synchronization `point` (watchdog.STEP_POINTS)."""
        mark(point)

    def optimizer_step(self, optimizer, store: list) -> Tuple[bool, Optional[float]]:
        """The optimizer's step unless the step is non-finite (then skipped or stopped, see the module docstring).
        Returns (stepped, grad norm)."""
        if self.check:
            mark("non-finite check")
            if self._nonfinite(store):
                return False, None
        mark("optimizer step")
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"iteration {self.iteration}: the optimizer skipped its step (non-finite gradients)")
        if self.check and grad_norm is not None and not math.isfinite(float(grad_norm)):
            # Finite gradients whose norm overflows: the update is applied already, so this cannot be skipped.
            self._report_nonfinite([f"rank {self.rank}: gradient norm {float(grad_norm)} after the optimizer step "
                                    f"(the gradients themselves were finite)"], stop=True, applied=True)
        return True, (float(grad_norm) if grad_norm is not None else None)

    def _device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _nonfinite(self, store: list) -> bool:
        import torch
        import torch.distributed as dist

        device = self._device()
        losses = torch.stack([item["lm loss"][0].to(device) for item in store]) if store else None
        bad_loss = (~torch.isfinite(losses)).sum().float() if losses is not None else torch.zeros((), device=device)
        bad_grad = self._grad_flag.to(device) if self._grad_flag is not None else torch.zeros((), device=device)
        flags = torch.stack([bad_loss, bad_grad]).float()
        dist.all_reduce(flags)  # the step's one extra collective: two numbers over the world
        if not bool(flags.sum() > 0):
            return False
        findings = []
        if losses is not None:
            for i in (~torch.isfinite(losses)).nonzero().flatten().tolist():
                ids = self._samples[i] if i < len(self._samples) else []
                findings.append(f"rank {self.rank}: loss {float(losses[i])} in micro-batch {i} of {len(store)} "
                                f"(samples: {', '.join(map(str, ids)) or 'unknown'})")
        if bad_grad.item() > 0:
            mbs = "; ".join(f"{i}: {', '.join(map(str, s)) or '?'}" for i, s in enumerate(self._samples))
            findings.append(f"rank {self.rank}: non-finite gradients before the data-parallel reduction "
                            f"(first parameter: {self._first_nonfinite_parameter()}; this rank's micro-batches "
                            f"{mbs or 'unknown'})")
        self._report_nonfinite(findings, stop=self.skipped + 1 > self.max_skipped)
        return True

    def _first_nonfinite_parameter(self) -> str:
        import torch

        # After the reduction: it is elementwise, so the first non-finite parameter is still where it began.
        for chunk in [self.ddp]:
            module = getattr(chunk, "module", chunk)
            for name, p in module.named_parameters():
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                if g is not None and not bool(torch.isfinite(g).all()):
                    return name
        return "unknown"

    def _report_nonfinite(self, findings: List[str], *, stop: bool, applied: bool = False) -> None:
        import torch.distributed as dist

        gathered: List[Optional[List[str]]] = [None] * self.world
        dist.all_gather_object(gathered, findings)
        knowers = [r for r, f in enumerate(gathered) if f]
        lines = [line for f in gathered if f for line in f]
        it = self.iteration
        if not applied:
            self.skipped += 1
        if knowers and self.rank == knowers[0]:
            head = f"[nonfinite] iteration {it}: a non-finite loss or gradient (--check-for-nan-in-loss-and-grad):"
            body = "\n".join("  " + line for line in lines)
            if any(" loss " in line for line in lines) and any("gradients" in line for line in lines):
                body += "\n  (a non-finite loss makes the gradients non-finite too: the loss is the first cause)"
            if stop:
                what = ("the update was applied already: stopping." if applied else
                        f"stopping: {self.skipped} non-finite step(s) in this run, over "
                        f"--max-skipped-nonfinite-steps {self.max_skipped}; this step was not applied.")
                more = "" if applied else ", or raise --max-skipped-nonfinite-steps to skip such steps"
                nxt = (f"Next: {resume_hint(self.args.save)}; look at the samples above (tools/check_data.py), "
                       f"lower --lr or raise --clip-grad{more}.")
            else:
                what = (f"skipped: no optimizer step (optimizer state and learning-rate schedule untouched, the "
                        f"micro-batches not retried); {self.skipped} of --max-skipped-nonfinite-steps "
                        f"{self.max_skipped} allowed in this run.")
                nxt = ""
            report("\n".join(filter(None, [head, body, what, nxt])), since=self._step_started)
        dist.barrier()  # the message is out before any rank exits (torchrun ends the others at the first exit)
        if stop:
            raise FaultExit("non-finite step")

    # -- saves ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self, iteration: int):
        """A save: injected write limits (tests); a failed save (reported once inside save_checkpoint) ends the
        run on every rank."""
        inj = self._injected("fsize", iteration)
        restore = None
        if inj is not None:
            import resource

            restore = (resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (inj.nbytes, restore[0][1]))
        try:
            yield
        except SaveFailed as e:
            raise FaultExit(str(e)) from None
        finally:
            if restore is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, restore[0])
                signal.signal(signal.SIGXFSZ, restore[1])

    def train_state(self) -> dict:
        """What the guard keeps in a checkpoint."""
        return {"skipped_nonfinite_steps": self.skipped}

    def load_train_state(self, train_state: dict) -> None:
        self.skipped = int(train_state.get("skipped_nonfinite_steps", 0))

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

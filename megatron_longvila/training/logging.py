"""Training logs: loss, tokens/s, TFLOP/s per device, MFU, memory; terminal progress, TensorBoard, JSON lines.

    TrainLogger(args, world_size, is_logging_rank)
        .log(iteration, loss, tokens, flops, step_time, lr, grad_norm, data_wait=None, extra=None) -> dict
                                                                                          (the metrics record)
        .close()

TFLOP/s per device are the step's model FLOPs (planning.flops: the step's own documents, causal attention per
document, the encoder per frame, the backward that runs given what trains) over the step time and the world size;
MFU divides them by the device's dense peak: --peak-tflops, else 989 TFLOP/s (H100/H200 bf16) on CUDA; on a CPU
no MFU is reported unless --peak-tflops is given (a CPU has no agreed peak).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Optional

import torch

__all__ = ["TrainLogger", "HOPPER_BF16_PEAK_TFLOPS"]

HOPPER_BF16_PEAK_TFLOPS = 989.0
"""H100/H200 SXM dense bf16 peak, the MFU denominator on CUDA unless --peak-tflops says otherwise."""


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainLogger:
    """Formats and writes one record per iteration on the logging rank (the last rank, as Megatron's)."""

    def __init__(self, args, *, world_size: int, is_logging_rank: bool):
        self.args = args
        self.world_size = world_size
        self.active = is_logging_rank
        self.peak = args.peak_tflops if args.peak_tflops is not None else (
            HOPPER_BF16_PEAK_TFLOPS if torch.cuda.is_available() else None)
        self.progress = self.active and sys.stdout.isatty() and not args.no_progress
        self.metrics = None
        self.tb = None
        self.t_start = time.perf_counter()
        self._steps = []
        if not self.active:
            return
        if args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
            self.metrics = open(args.metrics_file, "a")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # checked importable at start-up

            self.tb = SummaryWriter(args.tensorboard_dir)

    def log(self, iteration: int, *, loss: float, tokens: int, flops: Optional[float], step_time: float, lr: float,
            grad_norm: Optional[float], data_wait: Optional[float] = None, extra: Optional[dict] = None) -> dict:
        """flops: the step's model FLOPs over the whole world (None where the data stream does not count them);
        data_wait: seconds the step waited for its data (the slowest data-parallel rank's)."""
        tps = tokens / step_time if step_time > 0 else 0.0
        tflops = flops / step_time / self.world_size / 1e12 if flops is not None and step_time > 0 else None
        rec = {"iteration": iteration, "loss": loss, "tokens_per_s": tps, "tflops_per_device": tflops,
               "mfu": (tflops / self.peak) if self.peak and tflops is not None else None, "step_time_s": step_time,
               "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "flops": flops, "memory_gb": _memory_gb(),
               "data_wait_s": data_wait}
        if extra:
            rec.update(extra)
        if not self.active:
            return rec
        if self.metrics is not None:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"train/{k}", v, iteration)
        self._steps.append(step_time)
        if iteration % self.args.log_interval == 0 or iteration == self.args.train_iters:
            mfu = f" | MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
            gn = f" | grad norm {grad_norm:.3f}" if grad_norm is not None else ""
            # A CPU has no agreed peak and its TFLOP/s are noise at three decimals: shown only on GPUs (or with
            # --peak-tflops), at one decimal.
            fl = f" | {tflops:.1f} TFLOP/s/device{mfu}" if self.peak and tflops is not None else ""
            line = (f"iteration {iteration:>6}/{self.args.train_iters} | loss {loss:.4f} | lr {lr:.3e}{gn} | "
                    f"{tps:,.0f} tokens/s{fl} | {rec['memory_gb']:.2f} GB | {step_time * 1000:.0f} ms/step"
                    + (f" | data wait {data_wait * 1000:.0f} ms" if data_wait is not None else ""))
            if self.progress:
                done = iteration / self.args.train_iters
                bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
                recent = sorted(self._steps[-20:])[len(self._steps[-20:]) // 2]  # median: robust to a slow save
                eta = _duration(recent * (self.args.train_iters - iteration))
                sys.stdout.write(f"\r[{bar}] ETA {eta} | {line}")
                if iteration == self.args.train_iters:
                    sys.stdout.write("\n")
                sys.stdout.flush()
            else:
                print(line, flush=True)
        return rec

    def message(self, text: str) -> None:
        if self.active:
            if self.progress:
                sys.stdout.write("\n")
            print(text, flush=True)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()

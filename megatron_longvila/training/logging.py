"""Training logs: loss, tokens/s, TFLOP/s per device, MFU, memory; terminal progress, TensorBoard, JSON lines.

    TrainLogger(args, flops_per_token, world_size, is_logging_rank)
        .log(iteration, loss, tokens, step_time, lr, grad_norm, extra=None) -> dict   (the metrics record)
        .close()
    model_flops_per_token(llm_params, vision_params, num_layers, hidden, seq_length, vision_tokens_fraction)

MFU counts model FLOPs (forward + backward = 3 x forward, frozen parts included, as Megatron does) over the
device's dense peak: --peak-tflops, else 989 TFLOP/s (H100/H200 bf16) on CUDA; on a CPU no MFU is reported
unless --peak-tflops is given (a CPU has no agreed peak).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Optional

import torch

__all__ = ["TrainLogger", "model_flops_per_token", "HOPPER_BF16_PEAK_TFLOPS"]

HOPPER_BF16_PEAK_TFLOPS = 989.0
"""H100/H200 SXM dense bf16 peak, the MFU denominator on CUDA unless --peak-tflops says otherwise."""


def model_flops_per_token(*, llm_params: int, num_layers: int, hidden: int, avg_doc_len: float,
                          vision_params: int = 0, visual_token_fraction: float = 0.0, patches_per_token: float = 4.0
                          ) -> float:
    """Training FLOPs per sequence token: 6 x parameters for the matmuls, plus causal attention
    (12 x layers x hidden x doc_len / 2), plus the encoder's 6 x parameters per patch for visual tokens."""
    llm = 6.0 * llm_params + 6.0 * num_layers * hidden * avg_doc_len
    vision = 6.0 * vision_params * patches_per_token * visual_token_fraction
    return llm + vision


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

    def __init__(self, args, *, flops_per_token: float, world_size: int, is_logging_rank: bool):
        self.args = args
        self.flops_per_token = flops_per_token
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

    def log(self, iteration: int, *, loss: float, tokens: int, step_time: float, lr: float,
            grad_norm: Optional[float], extra: Optional[dict] = None) -> dict:
        tps = tokens / step_time if step_time > 0 else 0.0
        tflops = tps * self.flops_per_token / self.world_size / 1e12
        rec = {"iteration": iteration, "loss": loss, "tokens_per_s": tps, "tflops_per_device": tflops,
               "mfu": (tflops / self.peak) if self.peak else None, "step_time_s": step_time, "lr": lr,
               "grad_norm": grad_norm, "tokens": tokens, "memory_gb": _memory_gb()}
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
            fl = f" | {tflops:.1f} TFLOP/s/device{mfu}" if self.peak else ""
            line = (f"iteration {iteration:>6}/{self.args.train_iters} | loss {loss:.4f} | lr {lr:.3e}{gn} | "
                    f"{tps:,.0f} tokens/s{fl} | {rec['memory_gb']:.2f} GB | {step_time * 1000:.0f} ms/step")
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

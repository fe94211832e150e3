"""Run MM-SP attention on a mesh of CPU ranks against the single-process result, with its figures.

Used by `tools/bench_attention.py` and the README's demo. Each rank draws the same full inputs (same
seed), runs `mmsp_attention` forward and backward on its shard, and reports communication bytes (counted
in parallel/comm.py), attention work actually computed, time, and, gathered, the error against PyTorch's
own attention on the full sequence.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import List

import torch
import torch.distributed as dist

from ..parallel import comm
from ..parallel.launch import run_distributed
from ..parallel.mesh import build_mmsp_mesh
from ..parallel.sharding import plan_sequence
from .cost import comm_bytes_min
from .mmsp import mmsp_attention, reference_attention
from .ring import ATTENTION_STATS, reset_attention_stats


@dataclass
class AttentionCheckConfig:
    """One 2D-attention check or benchmark."""

    ulysses: int = 2
    """U: Ulysses group size."""
    ring: int = 2
    """R: ring size."""
    seq_lens: List[int] = field(default_factory=lambda: [1024])
    """Lengths of the documents packed in the sequence."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 8
    """KV heads (GQA when fewer than `heads`)."""
    head_dim: int = 64
    """Head dimension."""
    batch: int = 1
    """Micro-batch size (the same document layout in every row)."""
    causal: bool = True
    """Causal mask inside documents."""
    dtype: str = "float32"
    """float32, float64 or bfloat16."""
    backend: str = "auto"
    """Local attention kernel."""
    iters: int = 3
    """Timed iterations (after one warm-up)."""
    seed: int = 1234
    """Seed for the inputs."""
    ring_first: bool = False
    """Ring ranks consecutive instead of Ulysses ranks."""
    device: str = "cpu"
    """Where the tensors live: "cpu", or "cuda" (every rank on GPU 0, collectives staged through host memory
    by gloo: a correctness check of the CUDA kernels inside the mesh, not a speed measurement)."""


def attention_check_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    cfg = AttentionCheckConfig(**cfg_dict)
    dtype = getattr(torch, cfg.dtype)
    mesh = build_mmsp_mesh(cfg.ulysses, cfg.ring, ring_first=cfg.ring_first)
    plan = plan_sequence(mesh, cfg.seq_lens)
    g = torch.Generator().manual_seed(cfg.seed)
    T = plan.total_len
    full = [torch.randn(T, cfg.batch, h, cfg.head_dim, generator=g, dtype=torch.float32).to(cfg.device, dtype)
            for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads)]
    q, k, v, dout = full
    local = [plan.shard(t) for t in full]

    def step():
        ql, kl, vl = [t.detach().requires_grad_() for t in local[:3]]
        out = mmsp_attention(ql, kl, vl, plan, causal=cfg.causal, backend=cfg.backend)
        out.backward(local[3])
        return out, ql.grad, kl.grad, vl.grad

    step()  # warm-up (plan caches, allocator)
    times = []
    for _ in range(cfg.iters):
        dist.barrier()
        comm.reset_counters()
        reset_attention_stats()
        t0 = time.perf_counter()
        out, dq, dk, dv = step()
        times.append(time.perf_counter() - t0)
    measured = comm.total_bytes()
    by_kind = comm.counters()["bytes"]
    flops = ATTENTION_STATS["fwd_flops"] + ATTENTION_STATS["bwd_flops"]
    mins = comm_bytes_min(plan, cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim, full[0].element_size())

    result = {"rank": rank, "comm_bytes_measured": measured, "comm_bytes_min": mins[mesh.cp_rank]["total"],
              "comm_by_kind": by_kind, "flops": flops, "time_s": sorted(times)[len(times) // 2]}
    # Errors against the single-process oracle (every rank gathers; rank 0 reports).
    got = [plan.gather(x.detach()) for x in (out, dq, dk, dv)]
    if rank == 0:
        acc = torch.float64
        qr, kr, vr = [t.detach().to(acc).requires_grad_() for t in (q, k, v)]
        ref = reference_attention(qr, kr, vr, cfg.seq_lens, causal=cfg.causal)
        ref.backward(dout.to(acc))
        refs = [ref.detach(), qr.grad, kr.grad, vr.grad]
        names = ["out", "dq", "dk", "dv"]
        result["max_abs_err"] = max((a.to(acc) - b).abs().max().item() for a, b in zip(got, refs))
        result["rel_err"] = {n: ((a.to(acc) - b).norm() / b.norm().clamp_min(1e-300)).item()
                             for n, a, b in zip(names, got, refs)}
    return result


def summarize(cfg: AttentionCheckConfig, per_rank: List[dict]) -> dict:
    """One JSON-able object: totals, ratios and imbalance over ranks."""
    measured = sum(r["comm_bytes_measured"] for r in per_rank)
    minimum = sum(r["comm_bytes_min"] for r in per_rank)
    flops = [r["flops"] for r in per_rank]
    mean = sum(flops) / len(flops)
    return {
        "config": asdict(cfg),
        "cp_size": cfg.ulysses * cfg.ring,
        "comm_bytes_measured": measured // len(per_rank),
        "comm_bytes_min": minimum // len(per_rank),
        "comm_ratio": (measured / minimum) if minimum else (1.0 if measured == 0 else float("inf")),
        "comm_bytes_measured_per_rank": [r["comm_bytes_measured"] for r in per_rank],
        "comm_bytes_min_per_rank": [r["comm_bytes_min"] for r in per_rank],
        "comm_by_kind_rank0": per_rank[0]["comm_by_kind"],
        "flops_per_rank": flops,
        "flops_imbalance": (max(flops) / mean) if mean else 1.0,
        "max_abs_err": per_rank[0]["max_abs_err"],
        "rel_err": per_rank[0]["rel_err"],
        "time_s": max(r["time_s"] for r in per_rank),
    }


def run_attention_check(cfg: AttentionCheckConfig, timeout: float = 600.0) -> dict:
    per_rank = run_distributed(attention_check_worker, cfg.ulysses * cfg.ring, asdict(cfg), timeout=timeout)
    return summarize(cfg, per_rank)

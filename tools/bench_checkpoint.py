#!/usr/bin/env python
"""Bytes written and read per rank by the project's checkpoint saves and loads, on 4 CPU ranks (gloo).

    python tools/bench_checkpoint.py --json                       LLM hidden 256, 4 layers (about 40 MB saved)
    python tools/bench_checkpoint.py --hidden 48 --layers 2       the tests' tiny model

The tiny LongVILA's encoder with an LLM of --hidden x --layers (the tiny LLM's other settings), the distributed
optimizer after one Adam step, saved at TP 2 x DP 2 twice from the same state: the replica-0 ranks writing
(--no-ckpt-fully-parallel-save) and fully parallel (the default); each loaded at PP 2 x DP 2 (another layout), the
first with every rank reading its slice, the second with --ckpt-fully-parallel-load. Per rank: the bytes it wrote
(the manifest's sizes of the files it wrote) and read per phase of the load (checkpoint.distributed: the reading
thread's counter), and each save's and load's time (after a first, unreported save).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila.parallel.launch import run_distributed, stop_helpers  # noqa: E402

WORLD = 4


def _build(tp: int, pp: int, seed: int, hidden: int, layers: int):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.models.registry import LLMS, build_longvila
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)
    llm = dataclasses.replace(LLMS["tiny"], hidden_size=hidden, ffn_hidden_size=4 * hidden, num_layers=layers)
    model = build_longvila(encoder="siglip_tiny", llm=llm, tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp, media_token_id=7,
                           llm_overrides=dict(calculate_per_token_loss=True, batch_p2p_comm=False))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                       params_dtype=torch.float32), [ddp])
    return ddp, optimizer


def _world(rank, world, tmp, hidden, layers):
    with contextlib.redirect_stdout(sys.stderr):  # the checkpoint's own lines; stdout keeps the figures alone
        return _measure(world, tmp, hidden, layers)


def _measure(world, tmp, hidden, layers):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_longvila.checkpoint.distributed import (ParallelIO, bytes_written_per_rank, load_checkpoint,
                                                          save_checkpoint)

    ddp, optimizer = _build(2, 1, 1234, hidden, layers)
    g = torch.Generator().manual_seed(7 + ps.get_tensor_model_parallel_rank())
    for p in ddp.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=g))
    optimizer.step()
    data_state = {"position": torch.arange(8)}
    out = {"save": {}, "load": {}}
    # A first save, not reported, pays the one-time costs (imports, groups), so the two timed saves compare.
    save_checkpoint(os.path.join(tmp, "warm_up"), 1, ddp, optimizer, None, data_state=data_state, train_state={})
    for name, fully in (("plain", False), ("fully", True)):
        dist.barrier()
        t0 = time.perf_counter()
        final = save_checkpoint(os.path.join(tmp, name), 1, ddp, optimizer, None, data_state=data_state,
                                train_state={}, parallel_io=ParallelIO(fully_parallel_save=fully))
        seconds = time.perf_counter() - t0
        written = bytes_written_per_rank(final)
        out["save"][name] = {"seconds": round(seconds, 2), "written": [written.get(r, 0) for r in range(world)]}
    for name, fully in (("plain", False), ("fully", True)):
        ddp, optimizer = _build(1, 2, 99, hidden, layers)
        dist.barrier()
        t0 = time.perf_counter()
        loaded = load_checkpoint(os.path.join(tmp, name), ddp, optimizer, None, load_rng=False,
                                 parallel_io=ParallelIO(fully_parallel_load=fully))
        out["load"][name] = {"seconds": round(time.perf_counter() - t0, 2), "read": loaded.bytes_read_per_rank}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256, help="the LLM's hidden size (ffn 4x)")
    ap.add_argument("--layers", type=int, default=4, help="the LLM's layers (even: PP 2 at the load)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.layers % 2:
        ap.error(f"--layers {a.layers}: give an even number (the load is at PP 2)")
    tmp = tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        out = run_distributed(_world, WORLD, tmp, a.hidden, a.layers, timeout=1200)[0]
        total = sum(out["save"]["plain"]["written"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        stop_helpers()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "world": WORLD, "hidden": a.hidden,
              "layers": a.layers, "checkpoint_bytes": total, **out}
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    mib = 2 ** 20
    print(f"checkpoint: {total / mib:.1f} MiB (LLM hidden {a.hidden}, {a.layers} layers), saved at TP 2 x DP 2, "
          f"loaded at PP 2 x DP 2, {WORLD} CPU ranks")
    for name, s in out["save"].items():
        print(f"save {name:5s} {s['seconds']:6.2f} s  written per rank MiB: "
              + " ".join(f"{b / mib:.2f}" for b in s["written"]))
    for name, s in out["load"].items():
        phases = s["read"][0].keys()
        print(f"load {name:5s} {s['seconds']:6.2f} s  read per rank MiB: "
              + "; ".join(f"{p} " + " ".join("n/a" if r[p] is None else f"{r[p] / mib:.2f}" for r in s["read"])
                          for p in phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())

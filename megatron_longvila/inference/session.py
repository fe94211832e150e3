"""Setting up an inference run on this rank: distributed start, Megatron's parallel state, model, mesh.

    add_parallel_args(parser)                 Megatron's flags for TP and the MM-SP mesh
    start(args) -> None                       torch.distributed (torchrun's environment; gloo on CPU, NCCL on GPUs)
                                              and megatron.core.parallel_state
    load_model(path, args) -> (model, mesh)   any checkpoint format (conversion.load_longvila), MM-SP initialized
    tokenizer_for(load, explicit, record)     --tokenizer-model, the checkpoint's llm/ files, or bytes
    launch(fn, args, *fn_args)                run `fn` on this rank under torchrun, or on --cpu-ranks N local gloo
                                              ranks (no launcher needed); returns rank 0's result
"""

from __future__ import annotations

import datetime
import os
from typing import Callable

import torch
import torch.distributed as dist

from ..data.tokenizer import load_tokenizer_for
from ..parallel.launch import run_distributed
from ..parallel.sizes import add_parallel_args, parallel_sizes  # torch-free: the tools check flags before launching
from ..parallel.state import initialize_mmsp
from ..runtime.cpu import enable_cpu_runtime

__all__ = ["add_parallel_args", "start", "load_model", "launch", "tokenizer_for"]


def _sizes(args, world: int):
    return parallel_sizes(world, args.tensor_model_parallel_size, args.context_parallel_size,
                          args.hierarchical_context_parallel_sizes)


def start(args) -> None:
    """torch.distributed from torchrun's environment (when not started yet) and Megatron's parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    # The CPU only when asked: --cpu-ranks N (local gloo ranks); a machine whose GPUs are not visible stops here.
    cpu = bool(getattr(args, "cpu_ranks", None))
    if cpu and torch.cuda.is_available():
        raise SystemExit("--cpu-ranks on a machine with a visible CUDA device: drop --cpu-ranks and launch with "
                         "torchrun (one rank per GPU), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to this process: check the GPUs and their driver, or give "
                         "--cpu-ranks N to run on N local CPU ranks")
    if cpu:
        enable_cpu_runtime()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise SystemExit("no process group: launch with torchrun, or give --cpu-ranks N to run N local CPU ranks")
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("gloo" if cpu else "nccl", timeout=datetime.timedelta(minutes=30))
    tp, cp, hier = _sizes(args, dist.get_world_size())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=hier if cp > 1 else None)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    args._sizes = (tp, cp, hier)


def load_model(path: str, args):
    """The checkpoint's LongVILA model on this rank, MM-SP initialized; returns (model, mesh)."""
    # Here, not at the top: conversion/ loads megatron-core's models (seconds); the tools' --help answers first.
    from ..conversion import load_longvila

    tp, cp, hier = args._sizes
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    # calculate_per_token_loss: MM-SP's start-up checks ask for it with CP > 1 (scoring reports per-token losses).
    model = load_longvila(path, params_dtype=dtype, hierarchical_context_parallel_sizes=hier if cp > 1 else None,
                          llm_overrides={"calculate_per_token_loss": True})
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.eval()
    mesh = initialize_mmsp(model.config)
    return model, mesh


def tokenizer_for(load: str, explicit, record):
    """The run's tokenizer: --tokenizer-model, else the checkpoint's llm/ folder when it holds tokenizer files, else
    the byte tokenizer when the checkpoint was trained with it; otherwise a message saying what to give."""
    path = explicit
    llm = os.path.join(load, "llm")
    if path is None and os.path.isdir(llm) and any(
            os.path.isfile(os.path.join(llm, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        path = llm
    if path is None and (record.tokenizer.get("kind") not in (None, "bytes")):
        raise SystemExit(f"{load} carries no tokenizer files and was trained with a {record.tokenizer['kind']} "
                         f"tokenizer: give --tokenizer-model")
    try:
        tok = load_tokenizer_for(path, record)
    except FileNotFoundError as e:
        raise SystemExit(f"--tokenizer-model: {e}") from None
    want = record.tokenizer.get("vocab_size")
    if want is not None and tok.vocab_size != want:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} ids, the checkpoint was trained with {want}: give the "
                         f"checkpoint's tokenizer with --tokenizer-model")
    return tok


def _ranked(rank, world, fn, args, fn_args):
    os.environ.setdefault("MEGATRON_LONGVILA_RANK", str(rank))
    return fn(args, *fn_args)


def launch(fn: Callable, args, *fn_args):
    """Run `fn(args, *fn_args)` on every rank; with --cpu-ranks N spawn N gloo ranks here; returns rank 0's value."""
    if getattr(args, "cpu_ranks", None):
        threads = max(1, (os.cpu_count() or 1) // args.cpu_ranks)
        return run_distributed(_ranked, args.cpu_ranks, fn, args, fn_args, timeout=24 * 3600, threads=threads)[0]
    return fn(args, *fn_args)

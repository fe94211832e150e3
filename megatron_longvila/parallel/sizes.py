"""The ranks of a tool's launch and their split into Megatron's TP x CP (CP = Ulysses x ring), checked from the
command line and the environment alone: no torch, so a tool refuses a wrong mesh before any rank starts.

    add_parallel_args(parser)                    --tensor-model-parallel-size, --context-parallel-size,
                                                 --hierarchical-context-parallel-sizes U R, --cpu-ranks N, --bf16
    launch_world_size(cpu_ranks, environ) -> int the rank count: --cpu-ranks N (local CPU ranks, no launcher) or
                                                 torchrun's WORLD_SIZE; ArgumentError for both or neither
    parallel_sizes(world, tp, cp, hier) -> (tp, cp, [U, R])   the split, or ArgumentError naming the flag to change
    check_parallel_args(args, environ) -> (world, tp, cp, [U, R])   both checks on parsed arguments

Under torchrun every rank runs these checks alike (the same flags and environment), so the errors are marked raised
alike and a script's entry point (runtime.entry.run_main) prints them once.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import ArgumentError

__all__ = ["add_parallel_args", "launch_world_size", "parallel_sizes", "check_parallel_args"]


def add_parallel_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("parallelism (Megatron)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=None,
                   help="CP ranks (default: every rank not used by TP)")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs=2, default=None, metavar=("U", "R"),
                   help="Ulysses x ring (default: U = CP, R = 1)")
    g.add_argument("--cpu-ranks", type=int, default=None,
                   help="run on N local CPU ranks (gloo) without a launcher; under torchrun leave it out")
    g.add_argument("--bf16", action="store_true", help="bf16 weights (GPUs)")
    return p


def _under_torchrun(environ: Mapping[str, str]) -> bool:
    # The rule inference.session.start uses to find a launcher's process group.
    return "RANK" in environ


def launch_world_size(cpu_ranks: Optional[int], environ: Optional[Mapping[str, str]] = None) -> int:
    """The ranks this launch runs: `--cpu-ranks N`, or torchrun's WORLD_SIZE; never both, never neither."""
    environ = os.environ if environ is None else environ
    if cpu_ranks is not None:
        if cpu_ranks < 1:
            raise ArgumentError(f"--cpu-ranks {cpu_ranks}: give the number of local CPU ranks, 1 or more")
        if _under_torchrun(environ):
            raise ArgumentError(f"--cpu-ranks {cpu_ranks} under torchrun (RANK is set): torchrun already started the "
                                f"ranks; drop --cpu-ranks, or run without torchrun to start {cpu_ranks} CPU ranks here")
        return cpu_ranks
    if not _under_torchrun(environ):
        raise ArgumentError("no launcher: run under torchrun (one rank per GPU), or give --cpu-ranks N to run N "
                            "local CPU ranks")
    world = environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) < 1:
        raise ArgumentError(f"torchrun's WORLD_SIZE is {world!r}, not a rank count: launch with torchrun")
    return int(world)


def parallel_sizes(world: int, tp: int, cp: Optional[int], hier: Optional[Sequence[int]], *,
                   ranks: Optional[str] = None) -> Tuple[int, int, List[int]]:
    """(TP, CP, [U, R]) for `world` ranks: CP defaults to every rank TP leaves, [U, R] to [CP, 1]; the ranks beyond
    TP x CP are data-parallel replicas. `ranks` says where the rank count came from, for the messages."""
    ranks = ranks or f"{world} ranks"
    if tp < 1:
        raise ArgumentError(f"--tensor-model-parallel-size {tp}: give 1 or more")
    if world % tp:
        raise ArgumentError(f"{ranks} are not a multiple of --tensor-model-parallel-size {tp}")
    if cp is not None and cp < 1:
        raise ArgumentError(f"--context-parallel-size {cp}: give 1 or more")
    if hier is not None and (hier[0] < 1 or hier[1] < 1):
        raise ArgumentError(f"--hierarchical-context-parallel-sizes {hier[0]} {hier[1]}: give sizes of 1 or more")
    given_cp = cp
    cp = cp or world // tp
    u, r = hier if hier is not None else (cp, 1)
    if u * r != cp:
        if given_cp is not None:
            raise ArgumentError(f"--hierarchical-context-parallel-sizes {u} {r} multiply to {u * r}, not to "
                                f"--context-parallel-size {cp}")
        raise ArgumentError(f"--hierarchical-context-parallel-sizes {u} {r} ask for {u * r} context-parallel ranks, "
                            f"but {ranks} with --tensor-model-parallel-size {tp} give {cp}: launch {u * r * tp} "
                            f"ranks, or change the sizes")
    if world % (tp * cp):
        raise ArgumentError(f"{ranks} are not a multiple of TP x CP = {tp} x {cp}: change --context-parallel-size "
                            f"or the rank count")
    return tp, cp, [u, r]


def check_parallel_args(args: argparse.Namespace,
                        environ: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int, List[int]]:
    """The launch's rank count and its split, from the flags add_parallel_args defines (see the module docstring)."""
    world = launch_world_size(args.cpu_ranks, environ)
    ranks = f"the {world} ranks of --cpu-ranks {world}" if args.cpu_ranks is not None else f"torchrun's {world} ranks"
    tp, cp, hier = parallel_sizes(world, args.tensor_model_parallel_size, args.context_parallel_size,
                                  args.hierarchical_context_parallel_sizes, ranks=ranks)
    return world, tp, cp, hier

"""Distributed checkpoints (megatron.core.dist_checkpointing, torch_dist) with exact resume and safe commits.

Public API:
    save_checkpoint(save_dir, iteration, model, optimizer, scheduler, *, data_state, train_state, model_record=None,
                    hooks=None, retain=None, parallel_io=ParallelIO()) -> str
    load_checkpoint(load_dir, model, optimizer=None, scheduler=None, *, load_rng=True, iteration=None,
                    parallel_io=ParallelIO()) -> LoadedCheckpoint | None
    ParallelIO                                    how saves and loads spread their I/O over the ranks
    LoadedCheckpoint                              what a load restored (with the bytes this rank read)
    bytes_written_per_rank(iteration_dir) -> {rank: bytes}   from the checkpoint's manifest
(Folder naming, the tracker and safe_load: checkpoint.layout; the data position: checkpoint.data_state.)

What a checkpoint holds:
    model and optimizer: sharded tensors (resharded on load: TP, PP and CP layouts may differ);
    scheduler, iteration, consumed samples, layout: the common state (rank 0 writes it once);
    model_record.json: the model it holds (models.record), compared before a load reads any tensor;
    RNG states: one small file per rank under `extra/` (restored only at the saving layout);
    data position: one file per data-parallel replica under `data_state/` (checkpoint.data_state), read back by
    data-parallel rank at any TP, CP and PP layout.

Trust: the project's own files (`extra/`, the data position, the record) hold only tensors, numbers, strings and
containers and are read with `weights_only=True` or as JSON, so a crafted pickle there is refused. The torch_dist
part is read by torch's distributed-checkpoint reader, which unpickles its `.metadata` file: a torch_dist
checkpoint is trusted input, like any pickle. Untrusted weights come in through the safetensors layouts of the
conversion tools.

Why commits are safe: every rank writes into `<root>/.iter_0000010.partial`; once every rank reports success (a
flag reduced over ranks, checkpoint/agreement.py: a failure anywhere raises SaveFailed everywhere) rank 0 writes
`manifest.json` (each file's size and checksum, hashed by the rank that wrote it; checked on load before any
tensor is read), renames
it to `iter_0000010` (atomic on POSIX) and only then replaces `latest_checkpointed_iteration.txt` (written
to a temporary file and renamed). A process killed anywhere before the rename leaves the tracker naming
the previous checkpoint, which is untouched; the next save removes the stale partial directory. Saving an
iteration that exists already (a re-run of the same step) first moves the committed copy to `iter_N.old`: a
crash before the new copy is renamed into place leaves `iter_N.old` as the only copy, which loading uses and the
next save moves back (never deletes); the `.old` copy is removed only once `iter_N` is the new, complete one.

Who writes and reads what (ParallelIO): a shard replicated over a data-parallel x context-parallel group (every
model weight without the distributed optimizer, and the optimizer's state too) is written once. By default
(--ckpt-fully-parallel-save, Megatron's default) megatron-core's FullyParallelSaveStrategyWrapper spreads those
writes over the group, balanced by size, exchanging only metadata: at TP 2 x DP 2 each rank writes about a quarter of
the checkpoint instead of the DP-rank-0 ranks writing half each. --no-ckpt-fully-parallel-save keeps the replica-0
ranks writing everything. The files hold the same tensors either way (tests/training/test_parallel_save.py). With
--ckpt-fully-parallel-load each rank of the group reads a share of the group's shards and the group broadcasts them
(FullyParallelLoadStrategyWrapper); without it, every rank reads its whole slice. Each rank reads one data-position
file, its own replica's (checkpoint/data_state.py), at any TP, CP and PP layout.
Bytes written per rank are the sizes of the files each rank wrote (its manifest entries); bytes read per rank are
measured around each phase of a load (Linux's per-thread read counter, /proc/thread-self/io: the reading thread's
file reads; gloo receives on threads of its own, NCCL through the device). Rank 0 prints the bytes written with
each save; the training loop logs the bytes read with its "loaded iteration" line.

Saves are synchronous (--async-save is refused at start-up): the commit above checksums the files and renames the
folder only once every rank's files are on disk, and megatron-core 0.16.1's asynchronous writer hangs on CPU.
Workaround of megatron-core 0.16.1 (runtime/megatron_optimizer.py): the distributed optimizer is saved as
`fully_reshardable` with a repaired torch-Adam load.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError, CorruptCheckpoint
from ..models.record import write_model_record
from ..runtime.megatron_optimizer import (DISTRIBUTED_OPTIMIZER_SHARDING, load_optimizer_state,
                                          optimizer_sharded_state_dict)
from ..runtime.modules import unwrap_model
from . import integrity
from .agreement import SAVE_ERRORS, SaveAgreement
from .data_state import data_state_path, read_data_state, writes_data_state
from .layout import (checkpoint_dir, committed_folder, read_tracker, recover_interrupted_resave, safe_load,
                     write_tracker)

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedCheckpoint", "ParallelIO", "bytes_written_per_rank",
           "DISTRIBUTED_OPTIMIZER_SHARDING"]

FORMAT_VERSION = 2
"""1: the data position inside each rank's extra/ file; 2: one data_state/ file per data-parallel replica."""


@dataclass(frozen=True)
class ParallelIO:
    """How a save and a load spread their file I/O over the ranks (--ckpt-fully-parallel-save / -load)."""

    fully_parallel_save: bool = True
    """Spread the writes of each shard replicated over a data-parallel x context-parallel group over that group,
    balanced by size (megatron-core's FullyParallelSaveStrategyWrapper; one metadata all-gather per save). False: the
    rank holding replica 0 of a shard writes it (the DP-rank-0 ranks write everything replicated)."""
    fully_parallel_load: bool = False
    """Each rank of a data-parallel x context-parallel group reads a share of the group's shards and the group
    broadcasts them (FullyParallelLoadStrategyWrapper): fewer bytes read per rank, as many bytes sent over the
    group. False: every rank reads its whole slice."""


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` restored."""

    iteration: int
    """Iteration the checkpoint was saved after."""
    train_state: dict
    """The dict given to save_checkpoint as train_state (consumed samples, args snapshot, ...)."""
    data_state: Optional[dict]
    """This data-parallel rank's data position, or None when the checkpoint has none for it."""
    rng_restored: bool
    """Whether this rank's RNG states were restored (only at the saving layout)."""
    layout: dict = field(default_factory=dict)
    """The saving run's parallel layout."""
    bytes_read: Dict[str, Optional[int]] = field(default_factory=dict)
    """Bytes this rank read per phase: "verify" (its share of the manifest check), "tensors" (torch_dist's shards,
    metadata and common state), "data_state" (its replica's data position), "rng" (its extra/ file); None where
    the kernel offers no per-thread counter (not Linux)."""
    bytes_read_per_rank: List[Dict[str, Optional[int]]] = field(default_factory=list)
    """`bytes_read` of every rank, by global rank."""
    fully_parallel_load: bool = False
    """Whether the load was fully parallel (ParallelIO.fully_parallel_load)."""

    def reads_summary(self) -> str:
        """One line of the bytes the ranks read per phase (the training loop logs it once); "" when not measured."""
        if not self.bytes_read_per_rank:
            return ""
        how = "fully parallel" if self.fully_parallel_load else "each rank its slice"
        phases = list(self.bytes_read_per_rank[0])
        return f"bytes read per rank ({how}): " + "; ".join(
            f"{phase} {_spread([p.get(phase) for p in self.bytes_read_per_rank])}" for phase in phases)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_state() -> dict:
    """This rank's RNG states as tensors, numbers and strings only (loadable with weights_only=True)."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _replica_group():
    """The ranks that hold the same shards (same TP and PP rank): the data-parallel x context-parallel group, as
    Megatron-LM's fully parallel save and load use."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy(parallel_io: ParallelIO):
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    base = TorchDistSaveShardedStrategy("torch_dist", 1)
    if not parallel_io.fully_parallel_save:
        return base
    # Not cached between saves: a save's structure may change (a stage that unfreezes parameters).
    return FullyParallelSaveStrategyWrapper(base, _replica_group(), do_cache_distribution=False)


def _load_strategy(path: str, parallel_io: ParallelIO):
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    base = get_default_load_sharded_strategy(path)
    if not parallel_io.fully_parallel_load:
        return base
    return FullyParallelLoadStrategyWrapper(base, _replica_group())


_THREAD_IO = "/proc/thread-self/io"


def _thread_bytes_read() -> Optional[int]:
    """Bytes this thread has read so far (Linux's rchar of the calling thread), or None without the counter."""
    try:
        with open(_THREAD_IO) as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _ReadMeter:
    """Bytes this thread read per phase of a load."""

    def __init__(self):
        self.phases: Dict[str, Optional[int]] = {}
        self._start = None

    def start(self) -> None:
        self._start = _thread_bytes_read()

    def stop(self, phase: str) -> None:
        end = _thread_bytes_read()
        self.phases[phase] = (self.phases.get(phase) or 0) + end - self._start \
            if end is not None and self._start is not None else None


def bytes_written_per_rank(iteration_dir: str) -> Dict[int, int]:
    """{rank: bytes of the files that rank wrote} of a committed checkpoint, from its manifest (each rank hashes
    the files it wrote; rank 0 also the common files it wrote). Raises CheckpointError without a manifest."""
    manifest = integrity.read_manifest(iteration_dir)
    if manifest is None:
        raise CheckpointError(f"{iteration_dir} has no {integrity.MANIFEST}: the bytes each rank wrote are not known")
    out: Dict[int, int] = {}
    for entry in manifest["files"].values():
        out[int(entry["rank"])] = out.get(int(entry["rank"]), 0) + int(entry["size"])
    return dict(sorted(out.items()))


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _spread(per_rank: List[Optional[int]]) -> str:
    """'max X (rank r), min Y, total Z' of per-rank byte counts."""
    known = [(n, r) for r, n in enumerate(per_rank) if n is not None]
    if not known:
        return "not measured (no per-thread read counter on this system)"
    hi, lo = max(known), min(known)
    return f"max {_mib(hi[0])} (rank {hi[1]}), min {_mib(lo[0])} (rank {lo[1]}), total {_mib(sum(n for n, _ in known))}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, *, data_state: Optional[dict],
                    train_state: dict, model_record=None,
                    hooks: Optional[Dict[str, Callable[[], None]]] = None, retain: Optional[int] = None,
                    parallel_io: ParallelIO = ParallelIO()) -> str:
    """Save a complete checkpoint after `iteration`; every rank calls it. Returns the committed directory.

    Args:
        optimizer, scheduler: None for a weights-only checkpoint (it then loads with --pretrained-checkpoint or
            conversion.load_longvila, not with --load).
        data_state: this rank's data position (e.g. PackedIterator.state_dict()), or None.
        train_state: small JSON-able dict stored in the common state (consumed samples, args snapshot).
        model_record: the model's `models.record.ModelRecord` (default: the model's `.record`), written as
            model_record.json.
        hooks: test hooks by name ("after_write": after this rank wrote everything, before the commit;
            "after_move_old": on rank 0, after an existing iter_N was moved aside for a re-save).
        retain: keep only the newest `retain` committed checkpoints (--save-retain); None keeps all.
        parallel_io: who writes the replicated shards (ParallelIO.fully_parallel_save); the contents are the same.

    Rank 0 prints the bytes each rank wrote (from the manifest). Raises SaveFailed on every rank when any rank
    failed (printed once); the previous checkpoint stays the latest.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    final = checkpoint_dir(save_dir, iteration)
    partial = os.path.join(save_dir, f".iter_{iteration:07d}.partial")
    t0 = time.perf_counter()
    # Each phase ends in a success flag reduced over ranks (not a barrier): a failure on any rank -- a full disk, a
    # permission, a rank dying mid-write -- raises SaveFailed on every rank, and nothing is committed.
    agree = SaveAgreement(iteration, save_dir, final)
    algorithm = integrity.checksum_name()
    try:
        if rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            recover_interrupted_resave(save_dir)
            for name in os.listdir(save_dir):  # leftovers of killed saves (never a committed copy)
                if name.endswith(".partial"):
                    shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            os.makedirs(partial)
    except SAVE_ERRORS as e:  # reported through the agreement
        agree.failed("preparing the folder", e)
    agree.check("preparing the folder")

    try:
        model_sd = unwrap_model(model).sharded_state_dict()
        state = {"model": model_sd,
                 # No optimizer: a weights-only checkpoint (a model for inference or for the next stage's start).
                 "optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False) if optimizer
                 else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "iteration": iteration, "format_version": FORMAT_VERSION, "layout": _layout(),
                 "train_state": dict(train_state)}
        dist_checkpointing.save(state, partial, sharded_strategy=_save_strategy(parallel_io))
        extra = {"rng": _rng_state(), "layout": _layout(),
                 "dp_rank": ps.get_data_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                 "pp_rank": ps.get_pipeline_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank()}
        files = {f"extra/rank_{rank:05d}.pt": extra}
        if data_state is not None and writes_data_state():  # one file per replica (checkpoint/data_state.py)
            rel = os.path.relpath(data_state_path(partial, ps.get_data_parallel_rank()), partial)
            files[rel.replace(os.sep, "/")] = data_state
        for rel, obj in files.items():
            os.makedirs(os.path.dirname(os.path.join(partial, rel)), exist_ok=True)
            buf = io.BytesIO()
            torch.save(obj, buf)
            agree.add_entries(partial, {rel: integrity.write_bytes(os.path.join(partial, rel), buf.getvalue(),
                                                                   algorithm, rank)[1]})
        # This rank's shards, re-read while they are in the page cache (the manifest's checksums, see integrity.py).
        agree.add_entries(partial, integrity.entries_for(partial, integrity.owned_files(partial, rank), algorithm,
                                                         rank))
        agree.post_entries()
    except SAVE_ERRORS as e:  # torch's CheckpointException is a BaseException
        agree.failed("writing the shards", e)
    if hooks and "after_write" in hooks:
        hooks["after_write"]()
    agree.check("writing the shards")  # every rank's files are on disk before anything is committed

    try:
        if rank == 0:
            with open(os.path.join(partial, "train_state.json"), "w") as f:
                json.dump({"iteration": iteration, "layout": _layout(), **train_state}, f, indent=1, default=str)
            record = model_record if model_record is not None else getattr(unwrap_model(model), "record", None)
            if record is not None:
                write_model_record(partial, record)
            integrity.write_manifest(partial, iteration, agree.all_entries(), algorithm)
            if os.path.exists(final):  # re-saving an iteration: move the committed copy aside (module docstring)
                os.rename(final, final + ".old")
                if hooks and "after_move_old" in hooks:
                    hooks["after_move_old"]()
            os.rename(partial, final)
            write_tracker(save_dir, iteration)
            shutil.rmtree(final + ".old", ignore_errors=True)
    except SAVE_ERRORS as e:
        agree.failed("committing", e)
    agree.check("committing")
    if rank == 0:
        try:  # the save is committed: a manifest that cannot be read back here only loses the figures
            written = bytes_written_per_rank(final)
            figures = _spread([written.get(r, 0) for r in range(dist.get_world_size())])
        except (OSError, CheckpointError) as e:
            figures = f"not known ({e})"
        print(f"[checkpoint] saved iteration {iteration} to {final} in {time.perf_counter() - t0:.2f}s; bytes "
              f"written per rank ({'fully parallel' if parallel_io.fully_parallel_save else 'replica-0 ranks'}): "
              f"{figures}", flush=True)
        if retain:
            try:
                for gone in integrity.apply_retention(save_dir, retain, protect=iteration):
                    print(f"[checkpoint] removed {gone} (--save-retain {retain})", flush=True)
            except OSError as e:  # the save itself is committed; an old copy left behind is only disk space
                print(f"[checkpoint] warning: --save-retain {retain}: could not remove an old checkpoint ({e})",
                      flush=True)
    return final


def _verified(load_dir: str, path: str, iteration: int, *, checksums: bool, newest_valid: bool) -> str:
    """`path` when it verifies; else the newest older committed checkpoint that does (newest_valid) or an error."""
    try:
        integrity.verify_for_load(path, checksums)
        return path
    except CorruptCheckpoint as e:
        first = e
    if not newest_valid:
        raise CorruptCheckpoint(f"{first}. Refusing to load it: restore those files, or add --ckpt-load-newest-valid "
                                f"to resume from the newest checkpoint that verifies (python tools/check_checkpoint.py "
                                f"{load_dir} --all lists them)")
    refused = [str(first)]
    for older in reversed([i for i in integrity.committed_iterations(load_dir) if i < iteration]):
        candidate = checkpoint_dir(load_dir, older)
        try:
            integrity.verify_for_load(candidate, checksums)
        except CorruptCheckpoint as e:
            refused.append(str(e))
            continue
        if dist.get_rank() == 0:
            print("[checkpoint] " + "\n[checkpoint] ".join(refused) + f"\n[checkpoint] loading iteration {older} "
                  f"instead, the newest checkpoint that verifies (--ckpt-load-newest-valid)", flush=True)
        return candidate
    raise CorruptCheckpoint("no checkpoint under " + load_dir + " verifies (--ckpt-load-newest-valid): "
                            + " | ".join(refused) + ". Restore the files or start over with --pretrained-checkpoint")


def load_checkpoint(load_dir: str, model, optimizer=None, scheduler=None, *, load_rng: bool = True,
                    iteration: Optional[int] = None, verify: str = "checksums",
                    newest_valid: bool = False, parallel_io: ParallelIO = ParallelIO()) -> Optional[LoadedCheckpoint]:
    """Load the latest complete checkpoint under `load_dir` (or `iteration`); None when there is none.

    optimizer/scheduler None: weights only (a new training stage starting from the previous stage).
    load_rng: restore RNG states; at a different parallel layout that is impossible and raises unless False
    (Megatron's --no-load-rng).
    verify: before any tensor is read, check the checkpoint against its manifest: "checksums" (sizes and
    checksums, each rank a share), "sizes", or "none". A checkpoint that fails raises CorruptCheckpoint naming
    the files, unless newest_valid (--ckpt-load-newest-valid): then the newest older one that passes is loaded.
    parallel_io: whether each rank reads a share of its group's shards (ParallelIO.fully_parallel_load).
    The bytes each rank read, per phase, are in the result (LoadedCheckpoint.reads_summary: one line for a log).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            return None
    path = committed_folder(load_dir, iteration)  # iter_N, or its .old copy when a re-save of it was interrupted
    meter = _ReadMeter()
    if verify != "none":
        meter.start()
        path = _verified(load_dir, path, iteration, checksums=verify == "checksums", newest_valid=newest_valid)
        meter.stop("verify")
    model_sd = unwrap_model(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    meter.start()
    loaded = dist_checkpointing.load(state, path, sharded_strategy=_load_strategy(path, parallel_io))
    meter.stop("tensors")
    unwrap_model(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        if loaded.get("scheduler") is None:
            raise CheckpointError(f"{path} has no scheduler state; start the stage with --pretrained-checkpoint "
                                  f"instead of --load")
        scheduler.load_state_dict(loaded["scheduler"])

    layout = loaded.get("layout", {})
    same = layout == _layout()
    rank = dist.get_rank()
    rng_restored = False
    data_state = None
    if optimizer is not None:  # resuming: RNG and data position matter
        if same:
            if load_rng:
                meter.start()
                _set_rng_state(safe_load(os.path.join(path, "extra", f"rank_{rank:05d}.pt"))["rng"])
                meter.stop("rng")
                rng_restored = True
        else:
            if load_rng:
                raise CheckpointError(
                    f"{path} was saved at layout {layout}, this run is {_layout()}: RNG states do not reshard; add "
                    f"--no-load-rng (the model, optimizer, scheduler and data position still load)")
            if layout.get("dp") != ps.get_data_parallel_world_size():
                raise CheckpointError(
                    f"{path} was saved with data-parallel size {layout.get('dp')}, this run has "
                    f"{ps.get_data_parallel_world_size()}: the data position is per data-parallel rank; keep the "
                    f"data-parallel size (change --tensor/--pipeline/--context-parallel-size only) or start fresh "
                    f"with --pretrained-checkpoint")
        # This replica's own file only, at any TP, CP and PP layout (checkpoint/data_state.py).
        meter.start()
        data_state = read_data_state(path, ps.get_data_parallel_rank())
        meter.stop("data_state")
    per_rank = _gather_reads(meter.phases)
    _barrier()
    return LoadedCheckpoint(iteration=int(loaded["iteration"]), train_state=dict(loaded.get("train_state", {})),
                            data_state=data_state, rng_restored=rng_restored, layout=layout,
                            bytes_read=dict(meter.phases), bytes_read_per_rank=per_rank,
                            fully_parallel_load=parallel_io.fully_parallel_load)


def _gather_reads(phases: Dict[str, Optional[int]]) -> List[Dict[str, Optional[int]]]:
    """Every rank's bytes read per phase (one host all-gather on the checkpoint's gloo group)."""
    if dist.get_world_size() == 1:
        return [dict(phases)]
    out: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, dict(phases), group=integrity.agreement_group())
    return [dict(p) for p in out]


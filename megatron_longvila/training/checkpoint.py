"""Distributed checkpoints (megatron.core.dist_checkpointing, torch_dist) with exact resume and safe commits.

Public API:
    save_checkpoint(save_dir, iteration, model, optimizer, scheduler, *, data_state, train_state, model_record=None,
                    hooks=None) -> str
    load_checkpoint(load_dir, model, optimizer=None, scheduler=None, *, load_rng=True, iteration=None)
        -> LoadedCheckpoint | None
    read_tracker(ckpt_dir) -> int | None          iteration named by latest_checkpointed_iteration.txt
    checkpoint_dir(root, iteration) -> str        <root>/iter_0000010 (Megatron's naming)
    safe_load(path) -> object                     torch.load(weights_only=True), refusals as CheckpointError
    CheckpointError

What a checkpoint holds:
    model and optimizer: sharded tensors (resharded on load: TP, PP and CP layouts may differ);
    scheduler, iteration, consumed samples, layout: the common state (rank 0 writes it once);
    model_record.json: the model it holds (models.record), compared before a load reads any tensor;
    RNG states and data position: one small file per rank under `extra/` (per-rank state does not reshard:
    the data position is read back by data-parallel rank, the RNG only at the saving layout).

Trust: the project's own files (`extra/`, the data position, the record) hold only tensors, numbers, strings and
containers and are read with `weights_only=True` or as JSON, so a crafted pickle there is refused. The torch_dist
part is read by torch's distributed-checkpoint reader, which unpickles its `.metadata` file: a torch_dist
checkpoint is trusted input, like any pickle. Untrusted weights come in through the safetensors layouts of the
conversion tools.

Why commits are safe: every rank writes into `<root>/.iter_0000010.partial`; once every rank reports success (a
flag reduced over ranks, training/integrity.py: a failure anywhere raises SaveFailed everywhere) rank 0 writes
`manifest.json` (each file's size and checksum, hashed by the rank that wrote it; checked on load before any
tensor is read), renames
it to `iter_0000010` (atomic on POSIX) and only then replaces `latest_checkpointed_iteration.txt` (written
to a temporary file and renamed). A process killed anywhere before the rename leaves the tracker naming
the previous checkpoint, which is untouched; the next save removes the stale partial directory. Saving an
iteration that exists already (a re-run of the same step) first moves the committed copy to `iter_N.old`: a
crash before the new copy is renamed into place leaves `iter_N.old` as the only copy, which loading uses and the
next save moves back (never deletes); the `.old` copy is removed only once `iter_N` is the new, complete one.

Workarounds of megatron-core 0.16.1 (runtime/megatron_optimizer.py): the asynchronous save hangs on CPU, so saves
are synchronous; the distributed optimizer is saved as `fully_reshardable` with a repaired torch-Adam load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "read_tracker", "checkpoint_dir", "CheckpointError",
           "LoadedCheckpoint", "TRACKER", "DISTRIBUTED_OPTIMIZER_SHARDING", "safe_load", "CorruptCheckpoint",
           "SaveFailed"]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron's tracker file name: the iteration of the last complete checkpoint."""
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says which flag to change."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest (training/integrity.py); the message names the files."""


class SaveFailed(CheckpointError):
    """A save that failed on some rank: nothing was committed, the previous checkpoint stays the latest. Raised on
    every rank; `reported` is True on the one rank that printed the message."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


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


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number")
    return int(text)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_state() -> dict:
    """This rank's RNG states as tensors, numbers and strings only (loadable with weights_only=True)."""
    import random

    import numpy as np
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
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def safe_load(path: str):
    """A file the project wrote with torch.save, read with weights_only=True (no arbitrary unpickling)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # pickle.UnpicklingError for forbidden globals, RuntimeError for corrupt zip files
        raise CheckpointError(f"{path} is not a checkpoint file this project wrote (refused to unpickle it: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _recover_interrupted_resave(save_dir: str) -> None:
    """Undo a re-save of an existing iteration that stopped between moving the old copy aside and renaming the new
    one into place: `iter_N.old` without `iter_N` is the committed checkpoint; move it back. With `iter_N`
    present, `.old` is a superseded copy and is removed."""
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        if not name.endswith(".old"):
            continue
        old = os.path.join(save_dir, name)
        final = old[: -len(".old")]
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def _strategy():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1)


from ..runtime.megatron_optimizer import (DISTRIBUTED_OPTIMIZER_SHARDING, load_optimizer_state,  # noqa: E402
                                          optimizer_sharded_state_dict)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, *, data_state: Optional[dict],
                    train_state: dict, model_record=None,
                    hooks: Optional[Dict[str, Callable[[], None]]] = None, retain: Optional[int] = None) -> str:
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

    Raises SaveFailed on every rank when any rank failed (printed once); the previous checkpoint stays the latest.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from . import integrity

    rank = dist.get_rank()
    final = checkpoint_dir(save_dir, iteration)
    partial = os.path.join(save_dir, f".iter_{iteration:07d}.partial")
    t0 = time.perf_counter()
    # Each phase ends in a success flag reduced over ranks (not a barrier): a failure on any rank -- a full disk, a
    # permission, a rank dying mid-write -- raises SaveFailed on every rank, and nothing is committed.
    agree = integrity.SaveAgreement(iteration, save_dir, final)
    algorithm = integrity.checksum_name()
    try:
        if rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            _recover_interrupted_resave(save_dir)
            for name in os.listdir(save_dir):  # leftovers of killed saves (never a committed copy)
                if name.endswith(".partial"):
                    shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            os.makedirs(partial)
    except integrity.SAVE_ERRORS as e:  # reported through the agreement
        agree.failed("preparing the folder", e)
    agree.check("preparing the folder")

    try:
        model_sd = _unwrap(model).sharded_state_dict()
        state = {"model": model_sd,
                 # No optimizer: a weights-only checkpoint (a model for inference or for the next stage's start).
                 "optimizer": optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False) if optimizer
                 else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "iteration": iteration, "format_version": FORMAT_VERSION, "layout": _layout(),
                 "train_state": dict(train_state)}
        dist_checkpointing.save(state, partial, sharded_strategy=_strategy())
        extra = {"rng": _rng_state(), "data": data_state, "layout": _layout(),
                 "dp_rank": ps.get_data_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                 "pp_rank": ps.get_pipeline_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank()}
        os.makedirs(os.path.join(partial, "extra"), exist_ok=True)
        import io

        buf = io.BytesIO()
        torch.save(extra, buf)
        rel = f"extra/rank_{rank:05d}.pt"
        agree.add_entries(partial, {rel: integrity.write_bytes(os.path.join(partial, rel), buf.getvalue(),
                                                               algorithm, rank)[1]})
        # This rank's shards, re-read while they are in the page cache (the manifest's checksums, see integrity.py).
        agree.add_entries(partial, integrity.entries_for(partial, integrity.owned_files(partial, rank), algorithm,
                                                         rank))
        agree.post_entries()
    except integrity.SAVE_ERRORS as e:  # torch's CheckpointException is a BaseException
        agree.failed("writing the shards", e)
    if hooks and "after_write" in hooks:
        hooks["after_write"]()
    agree.check("writing the shards")  # every rank's files are on disk before anything is committed

    try:
        if rank == 0:
            with open(os.path.join(partial, "train_state.json"), "w") as f:
                json.dump({"iteration": iteration, "layout": _layout(), **train_state}, f, indent=1, default=str)
            record = model_record if model_record is not None else getattr(_unwrap(model), "record", None)
            if record is not None:
                from ..models.record import write_model_record

                write_model_record(partial, record)
            integrity.write_manifest(partial, iteration, agree.all_entries(), algorithm)
            if os.path.exists(final):  # re-saving an iteration: move the committed copy aside (module docstring)
                os.rename(final, final + ".old")
                if hooks and "after_move_old" in hooks:
                    hooks["after_move_old"]()
            os.rename(partial, final)
            tmp = os.path.join(save_dir, TRACKER + ".tmp")
            with open(tmp, "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(save_dir, TRACKER))
            shutil.rmtree(final + ".old", ignore_errors=True)
    except integrity.SAVE_ERRORS as e:
        agree.failed("committing", e)
    agree.check("committing")
    if rank == 0:
        print(f"[checkpoint] saved iteration {iteration} to {final} in {time.perf_counter() - t0:.2f}s", flush=True)
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
    from . import integrity

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
                    newest_valid: bool = False) -> Optional[LoadedCheckpoint]:
    """Load the latest complete checkpoint under `load_dir` (or `iteration`); None when there is none.

    optimizer/scheduler None: weights only (a new training stage starting from the previous stage).
    load_rng: restore RNG states; at a different parallel layout that is impossible and raises unless False
    (Megatron's --no-load-rng).
    verify: before any tensor is read, check the checkpoint against its manifest: "checksums" (sizes and
    checksums, each rank a share), "sizes", or "none". A checkpoint that fails raises CorruptCheckpoint naming
    the files, unless newest_valid (--ckpt-load-newest-valid): then the newest older one that passes is loaded.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            return None
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"  # a re-save of this iteration was interrupted: this is the committed copy
    if not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(load_dir, TRACKER)} names iteration {iteration} but {path} is missing")
    if verify != "none":
        path = _verified(load_dir, path, iteration, checksums=verify == "checksums", newest_valid=newest_valid)
    model_sd = _unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
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
    extra_dir = os.path.join(path, "extra")
    if optimizer is not None:  # resuming: RNG and data position matter
        if same:
            extra = safe_load(os.path.join(extra_dir, f"rank_{rank:05d}.pt"))
            data_state = extra["data"]
            if load_rng:
                _set_rng_state(extra["rng"])
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
            dp_rank = ps.get_data_parallel_rank()
            for name in sorted(os.listdir(extra_dir)):
                extra = safe_load(os.path.join(extra_dir, name))
                if extra["dp_rank"] == dp_rank:
                    data_state = extra["data"]
                    break
    _barrier()
    return LoadedCheckpoint(iteration=int(loaded["iteration"]), train_state=dict(loaded.get("train_state", {})),
                            data_state=data_state, rng_restored=rng_restored, layout=layout)


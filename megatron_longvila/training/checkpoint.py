"""Distributed checkpoints (megatron.core.dist_checkpointing, torch_dist) with exact resume and safe commits.

Public API:
    save_checkpoint(save_dir, iteration, model, optimizer, scheduler, *, data_state, train_state, hooks=None)
    load_checkpoint(load_dir, model, optimizer=None, scheduler=None, *, load_rng=True, strict_layout=False)
        -> LoadedCheckpoint | None
    read_tracker(ckpt_dir) -> int | None          iteration named by latest_checkpointed_iteration.txt
    checkpoint_dir(root, iteration) -> str        <root>/iter_0000010 (Megatron's naming)
    model_sharded_state_dict(model) -> dict       LongVILA's sharded state dict (DDP wrapper stripped)
    CheckpointError

What a checkpoint holds:
    model and optimizer: sharded tensors (resharded on load: TP, PP and CP layouts may differ);
    scheduler, iteration, consumed samples, layout: the common state (rank 0 writes it once);
    RNG states and data position: one small file per rank under `extra/` (per-rank state does not reshard:
    the data position is read back by data-parallel rank, the RNG only at the saving layout).

Why commits are safe: every rank writes into `<root>/.iter_0000010.partial`; after a barrier rank 0 renames
it to `iter_0000010` (atomic on POSIX) and only then replaces `latest_checkpointed_iteration.txt` (written
to a temporary file and renamed). A process killed anywhere before the rename leaves the tracker naming
the previous checkpoint, which is untouched; the next save removes the stale partial directory.

Traps avoided (see the project's ENVIRONMENT.md): the asynchronous save hangs on CPU, so saves are
synchronous; the distributed optimizer is saved as `fully_reshardable` (the default
`fully_sharded_model_space` fails), and Adam's `step` is un-shared after loading.
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

__all__ = ["save_checkpoint", "load_checkpoint", "read_tracker", "checkpoint_dir", "model_sharded_state_dict",
           "CheckpointError", "LoadedCheckpoint", "TRACKER"]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron's tracker file name: the iteration of the last complete checkpoint."""
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says which flag to change."""


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


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict, with each part's own (TP/PP-aware) sharding.

    LongVILA's LLM sits inside a plain-torch adapter (`GPTAdapter.model`); Megatron's default traversal would
    treat the adapter's tensors as replicated, so the GPT's own `sharded_state_dict` is called here instead.
    """
    m = _unwrap(model)
    lm = getattr(m, "language_model", None)
    if lm is None or not hasattr(lm, "model"):
        return m.sharded_state_dict()
    sd: Dict = {}
    for name in ("vision_model", "projector"):
        part = getattr(m, name, None)
        if part is not None:
            sd.update(part.sharded_state_dict(prefix=f"{name}."))
    sd.update(lm.model.sharded_state_dict(prefix="language_model.model."))
    return sd


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# megatron-core's checkpoint writer calls torch.cuda directly; runtime.cpu does not cover these modules yet.
_CKPT_MODULES = ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                 "megatron.core.dist_checkpointing.strategies.state_dict_saver")


def _cpu_checkpoint_io() -> None:
    """Under the CPU runtime, give the checkpoint writer modules the same CPU view of torch.cuda."""
    import importlib

    from ..runtime.cpu import cpu_runtime_active

    if not cpu_runtime_active():
        return
    proxy = importlib.import_module("megatron.core.utils").torch  # the CPU runtime's per-module torch
    for name in _CKPT_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy


def _strategy():
    _cpu_checkpoint_io()
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1)


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool) -> dict:
    kwargs = {}
    if getattr(getattr(optimizer, "config", None), "use_distributed_optimizer", False):
        kwargs["sharding_type"] = "fully_reshardable"
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, *, data_state: Optional[dict],
                    train_state: dict, hooks: Optional[Dict[str, Callable[[], None]]] = None) -> str:
    """Save a complete checkpoint after `iteration`; every rank calls it. Returns the committed directory.

    Args:
        data_state: this rank's data position (e.g. PackedIterator.state_dict()), or None.
        train_state: small JSON-able dict stored in the common state (consumed samples, args snapshot).
        hooks: test hooks by name ("after_write": after this rank wrote everything, before the commit).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    final = checkpoint_dir(save_dir, iteration)
    partial = os.path.join(save_dir, f".iter_{iteration:07d}.partial")
    t0 = time.perf_counter()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of killed saves
            if name.endswith(".partial") or name.endswith(".old"):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        os.makedirs(partial)
    _barrier()

    model_sd = model_sharded_state_dict(model)
    state = {"model": model_sd,
             "optimizer": _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "iteration": iteration, "format_version": FORMAT_VERSION, "layout": _layout(),
             "train_state": dict(train_state)}
    dist_checkpointing.save(state, partial, sharded_strategy=_strategy())
    extra = {"rng": _rng_state(), "data": data_state, "layout": _layout(),
             "dp_rank": ps.get_data_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
             "pp_rank": ps.get_pipeline_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank()}
    os.makedirs(os.path.join(partial, "extra"), exist_ok=True)
    torch.save(extra, os.path.join(partial, "extra", f"rank_{rank:05d}.pt"))
    if hooks and "after_write" in hooks:
        hooks["after_write"]()
    _barrier()  # every rank's files are on disk before anything is committed

    if rank == 0:
        with open(os.path.join(partial, "train_state.json"), "w") as f:
            json.dump({"iteration": iteration, "layout": _layout(), **train_state}, f, indent=1, default=str)
        if os.path.exists(final):  # re-saving an iteration: move the old copy out of the way first
            os.rename(final, final + ".old")
        os.rename(partial, final)
        tmp = os.path.join(save_dir, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, TRACKER))
        shutil.rmtree(final + ".old", ignore_errors=True)
    _barrier()
    if rank == 0:
        print(f"[checkpoint] saved iteration {iteration} to {final} in {time.perf_counter() - t0:.2f}s", flush=True)
    return final


def _unshare_adam_step(optimizer) -> None:
    # After a fully_reshardable load every parameter's Adam state holds the same `step` tensor, and torch's
    # Adam increments it once per parameter: give each parameter its own copy.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if isinstance(st, dict) and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def load_checkpoint(load_dir: str, model, optimizer=None, scheduler=None, *, load_rng: bool = True,
                    iteration: Optional[int] = None) -> Optional[LoadedCheckpoint]:
    """Load the latest complete checkpoint under `load_dir` (or `iteration`); None when there is none.

    optimizer/scheduler None: weights only (a new training stage starting from the previous stage).
    load_rng: restore RNG states; at a different parallel layout that is impossible and raises unless False
    (Megatron's --no-load-rng).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            return None
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(load_dir, TRACKER)} names iteration {iteration} but {path} is missing")
    model_sd = model_sharded_state_dict(model)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_step(optimizer)
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
            extra = torch.load(os.path.join(extra_dir, f"rank_{rank:05d}.pt"), weights_only=False)
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
                extra = torch.load(os.path.join(extra_dir, name), weights_only=False)
                if extra["dp_rank"] == dp_rank:
                    data_state = extra["data"]
                    break
    _barrier()
    return LoadedCheckpoint(iteration=int(loaded["iteration"]), train_state=dict(loaded.get("train_state", {})),
                            data_state=data_state, rng_restored=rng_restored, layout=layout)


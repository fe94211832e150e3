"""Distributed checkpoints (megatron.core.dist_checkpointing, torch_dist) with exact resume and safe commits.

Public API:
    save_checkpoint(save_dir, iteration, model, optimizer, scheduler, *, data_state, train_state, hooks=None)
    load_checkpoint(load_dir, model, optimizer=None, scheduler=None, *, load_rng=True, strict_layout=False)
        -> LoadedCheckpoint | None
    read_tracker(ckpt_dir) -> int | None          iteration named by latest_checkpointed_iteration.txt
    checkpoint_dir(root, iteration) -> str        <root>/iter_0000010 (Megatron's naming)
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
synchronous. The distributed optimizer is saved as `fully_reshardable` (DISTRIBUTED_OPTIMIZER_SHARDING; the
default `fully_sharded_model_space` fails); with torch's Adam (no Transformer Engine or apex FusedAdam) its state
is created before a load, loaded in two phases (megatron-core's one-call load fails on `step`), and every
parameter gets its own `step` afterwards (a shared one is incremented once per parameter: wrong updates, no
error).
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
           "LoadedCheckpoint", "TRACKER", "DISTRIBUTED_OPTIMIZER_SHARDING"]

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


def _strategy():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1)


DISTRIBUTED_OPTIMIZER_SHARDING = "fully_reshardable"
"""How the distributed optimizer's state is laid out in a checkpoint. `fully_reshardable` stores each
parameter's Adam moments in the parameter's own shape and sharding, so optimizer state reshards across TP, PP
and CP like the model (this module's promise); `dp_reshardable` stores the flat per-DP-rank buffers and
reshards only across DP; megatron-core's default (`fully_sharded_model_space`) fails to save in 0.16.1. The cost:
saving all-gathers each model-parallel rank's optimizer state over its DP group (transient memory of one
unsharded fp32 copy of that rank's moments)."""


def _is_distributed(opt) -> bool:
    return bool(getattr(getattr(opt, "config", None), "use_distributed_optimizer", False))


def _inner_optimizers(optimizer):
    """(Megatron optimizer, wrapped torch optimizer) pairs, through a ChainedOptimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield opt, inner


def _init_optimizer_state(optimizer) -> None:
    """Create Adam's state before a load (its values are overwritten by the load).

    The distributed optimizer's loading state dict is built from its current state, and with torch's Adam (no
    Transformer Engine or apex FusedAdam) that needs a `step` in every parameter's state; a fresh optimizer has
    none. Each parameter gets its own `step` tensor (see _unshare_adam_step).
    """
    for opt, inner in _inner_optimizers(optimizer):
        if not _is_distributed(opt):
            continue
        if opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)  # exp_avg, exp_avg_sq where missing
        if isinstance(inner, torch.optim.Adam) or isinstance(inner, torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0, dtype=torch.float32))


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool) -> dict:
    if is_loading:
        _init_optimizer_state(optimizer)
    metadata = {}
    if any(_is_distributed(opt) for opt, _ in _inner_optimizers(optimizer)):
        metadata["distrib_optim_sharding_type"] = DISTRIBUTED_OPTIMIZER_SHARDING
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


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

    model_sd = _unwrap(model).sharded_state_dict()
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
    # The distributed optimizer's load gives every parameter's Adam state one and the same `step` tensor, and
    # torch's Adam increments it in place once per parameter (the next steps' bias corrections go wrong, with no
    # error): give each parameter its own copy.
    for _, inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if isinstance(st, dict) and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _uses_torch_adam(opt) -> bool:
    inner = getattr(opt, "optimizer", None)
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _load_distributed_torch_adam(opt, state: dict) -> None:
    """The distributed optimizer's fully_reshardable load, in two phases, for torch's Adam.

    megatron-core's one-call load first gives every parameter's Adam state a `step`, then copies the loaded
    moments into exactly the keys that state holds, and the checkpoint has no per-parameter `step` (KeyError:
    'step'). So: load the common part (param groups and the step), take `step` out, load the moments, put it back.
    """
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    opt.load_state_dict(state)
    inner = opt.optimizer
    steps = {id(st["step"]): st["step"] for st in inner.state.values() if "step" in st}
    if len(steps) != 1:
        raise CheckpointError(f"expected one Adam step after loading the distributed optimizer's common state, "
                              f"found {len(steps)}")
    step = next(iter(steps.values()))
    for st in inner.state.values():
        st.pop("step", None)
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for st in inner.state.values():
        st["step"] = step  # still one tensor for all: _unshare_adam_step, run after every optimizer load, splits it


def _load_optimizer_state(optimizer, state) -> None:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    special = [_is_distributed(o) and _uses_torch_adam(o) for o in chained]
    if not any(special):
        optimizer.load_state_dict(state)
    else:
        if len(chained) == 1:
            states = [state]
        else:
            if len(state) != len(chained):
                raise CheckpointError(f"the checkpoint holds {len(state)} optimizers' states, this run has "
                                      f"{len(chained)}")
            states = [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
        for opt, st, sp in zip(chained, states, special):
            if sp and st.get("param_state_sharding_type") == DISTRIBUTED_OPTIMIZER_SHARDING:
                _load_distributed_torch_adam(opt, st)
            else:
                opt.load_state_dict(st)
    _unshare_adam_step(optimizer)


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
    model_sd = _unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
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


"""Megatron-Core 0.16.1 distributed optimizer with torch's Adam: the checkpoint workarounds, in one place.

Verified on megatron-core 0.16.1 (`versions.WORKAROUNDS["adam_step_repair"]`); applied only to the
distributed optimizer wrapping torch's Adam/AdamW (Transformer Engine's and apex's FusedAdam keep their step
elsewhere). What goes wrong without it, measured on CPU with gloo:
- the one-call `fully_reshardable` load fails with `KeyError: 'step'` (the loading state dict is built from the
  optimizer's current state, which a fresh torch Adam does not have, and the checkpoint has no per-parameter
  step);
- after a two-phase load every parameter shares one `step` tensor, which torch's Adam increments once per
  parameter: the bias corrections of every following step are wrong, with no error.

    DISTRIBUTED_OPTIMIZER_SHARDING
    optimizer_sharded_state_dict(optimizer, model_sd, is_loading) -> dict
    load_optimizer_state(optimizer, state)
"""

from __future__ import annotations

import torch

from ..errors import OptimizerStateError
from .versions import applying

__all__ = ["DISTRIBUTED_OPTIMIZER_SHARDING", "optimizer_sharded_state_dict", "load_optimizer_state",
           "OptimizerStateError"]


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


def optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool) -> dict:
    if is_loading:
        _init_optimizer_state(optimizer)
    metadata = {}
    if any(_is_distributed(opt) for opt, _ in _inner_optimizers(optimizer)):
        metadata["distrib_optim_sharding_type"] = DISTRIBUTED_OPTIMIZER_SHARDING
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)




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
    applying("adam_step_repair")
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    opt.load_state_dict(state)
    inner = opt.optimizer
    steps = {id(st["step"]): st["step"] for st in inner.state.values() if "step" in st}
    if len(steps) != 1:
        raise OptimizerStateError(f"expected one Adam step after loading the distributed optimizer's common state, "
                              f"found {len(steps)}")
    step = next(iter(steps.values()))
    for st in inner.state.values():
        st.pop("step", None)
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for st in inner.state.values():
        st["step"] = step  # still one tensor for all: _unshare_adam_step, run after every optimizer load, splits it


def load_optimizer_state(optimizer, state) -> None:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    special = [_is_distributed(o) and _uses_torch_adam(o) for o in chained]
    if not any(special):
        optimizer.load_state_dict(state)
    else:
        if len(chained) == 1:
            states = [state]
        else:
            if len(state) != len(chained):
                raise OptimizerStateError(f"the checkpoint holds {len(state)} optimizers' states, this run has "
                                      f"{len(chained)}")
            states = [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
        for opt, st, sp in zip(chained, states, special):
            if sp and st.get("param_state_sharding_type") == DISTRIBUTED_OPTIMIZER_SHARDING:
                _load_distributed_torch_adam(opt, st)
            else:
                opt.load_state_dict(st)
    _unshare_adam_step(optimizer)

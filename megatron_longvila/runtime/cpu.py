"""Let megatron-core 0.16.1 run on a CPU-only build of torch (gloo), for tests, CI and demos.

Public API:
    enable_cpu_runtime() -> bool      patch megatron-core once; True when the CPU runtime is active
    cpu_runtime_active() -> bool      whether it is active in this process
    PATCHED_MODULES                   the megatron-core modules whose view of `torch` is redirected

Megatron-Core calls CUDA directly in places that tiny CPU models still pass through (measured with megatron-core
0.16.1; registered in runtime.versions.WORKAROUNDS). Rather than patching `torch` for the whole process, this module:

- gives each module in PATCHED_MODULES its own `torch` (a proxy of the real one) in which `torch.cuda`'s
  device, synchronization, cache and RNG entry points mean "the CPU", and factory functions
  (`torch.zeros(..., device="cuda")`, `torch.tensor(..., pin_memory=True)`, ...) build CPU tensors;
- replaces the tensor-parallel RNG tracker's CUDA state accessors with the CPU generator's;
- makes `Tensor.cuda()` / `Module.cuda()` return the object itself only when called from megatron-core code
  (CUDA_CALLERS; anything else still gets torch's own error);
- makes `Tensor.type()` (no argument) name a CPU tensor's CUDA type ("torch.cuda.FloatTensor") only when called
  from the distributed optimizer, whose parameter sorting accepts nothing else;
- replaces fp32 gradient clipping, which asserts a CUDA tensor type, with an equivalent in-place scaling.

It never activates when CUDA is available: on a GPU machine `enable_cpu_runtime()` changes nothing and
returns False. Calling it again is harmless.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable, List

import torch

__all__ = ["enable_cpu_runtime", "cpu_runtime_active", "PATCHED_MODULES"]

PATCHED_MODULES: List[str] = [
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    # The checkpoint writer synchronizes and asks for the current device.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # The fully parallel load synchronizes and exchanges shards through "cuda" buffers.
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
]

_ACTIVE = False
_CPU = torch.device("cpu")

_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like", "linspace")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is a CUDA ordinal in megatron-core's calls (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        # Pinned memory needs an accelerator; on the CPU it is meaningless.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


class _NoNvtx:
    @staticmethod
    def range_push(msg):
        return None

    @staticmethod
    def range_pop():
        return None


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as megatron-core sees it under the CPU runtime; anything not listed is the real one."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _CPU
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda: None
        # The tensor-parallel RNG tracker keeps named generator states: on the CPU they are CPU states.
        self.manual_seed = torch.manual_seed
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.nvtx = _NoNvtx()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A per-module stand-in for `torch`: CPU-mapped `cuda` and factories, everything else delegated."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise RuntimeError("CPU runtime: graph-safe (CUDA graph) RNG states do not exist on the CPU; "
                           "leave use_cudagraphable_rng off")
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise RuntimeError("CPU runtime: graph-safe (CUDA graph) RNG states do not exist on the CPU; "
                           "leave use_cudagraphable_rng off")
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """In-place scaling of fp32 gradients by max_norm / total_norm (megatron-core's, without its CUDA assert)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is None:
            continue
        if g.dtype not in (torch.float32, torch.bfloat16) or (not use_decoupled_grad and g.dtype != torch.float32):
            raise TypeError(f"gradient clipping expects fp32 gradients, got {g.dtype}")
        grads.append(g.to_local() if hasattr(g, "to_local") else g)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


CUDA_CALLERS: List[str] = ["megatron.core."]
"""Module-name prefixes whose `Tensor.cuda()` / `Module.cuda()` calls mean "stay on the CPU" under this runtime.
`training.megatron_lm` adds "megatron.training." for Megatron-LM's trainer; one wrapper serves every caller."""


def _from_megatron() -> bool:
    caller = sys._getframe(2).f_globals.get("__name__", "") + "."
    return any(caller.startswith(p) for p in CUDA_CALLERS)


def _megatron_cuda(original: Callable) -> Callable:
    def cuda(self, *args, **kwargs):
        return self if _from_megatron() else original(self, *args, **kwargs)

    cuda.__wrapped__ = original
    cuda._longvila_cpu_runtime = True
    return cuda


# The only megatron-core module whose `.type()` checks are not covered otherwise (clip_grads' is replaced above;
# optimizer.py's belong to the 16-bit optimizer, which CPU runs do not use).
_TYPE_CALLERS = ("megatron.core.optimizer.distrib_optimizer",)


def _megatron_tensor_type(original: Callable) -> Callable:
    def type_(self, *args, **kwargs):
        if (not args and not kwargs and self.device.type == "cpu"
                and sys._getframe(1).f_globals.get("__name__", "") in _TYPE_CALLERS):
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, *args, **kwargs)

    type_.__wrapped__ = original
    return type_


def cpu_runtime_active() -> bool:
    """Whether `enable_cpu_runtime()` has patched megatron-core in this process."""
    return _ACTIVE


def enable_cpu_runtime() -> bool:
    """Patch megatron-core so that it runs on the CPU; return True when the CPU runtime is active.

    Does nothing and returns False when CUDA is available (a GPU run must never take this path). Idempotent.
    Call it before building models, optimizers or schedules (after importing megatron is fine: the patches
    replace module attributes, which megatron-core looks up at call time).
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    from .versions import applying

    applying("cpu_runtime")
    applying("cpu_runtime_torch", torch.__version__)
    cpu_torch = _CpuTorch()
    for name in PATCHED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is not torch:
            raise RuntimeError(f"CPU runtime: {name} does not use `torch` as expected; this module is written "
                               f"for megatron-core 0.16.1")
        mod.torch = cpu_torch

    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_cuda_rng_state = _get_cpu_rng_state
    rng._set_cuda_rng_state = _set_cpu_rng_state

    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    if not getattr(torch.Tensor.cuda, "_longvila_cpu_runtime", False):
        torch.Tensor.cuda = _megatron_cuda(torch.Tensor.cuda)
        torch.nn.Module.cuda = _megatron_cuda(torch.nn.Module.cuda)
    torch.Tensor.type = _megatron_tensor_type(torch.Tensor.type)
    _ACTIVE = True
    return True

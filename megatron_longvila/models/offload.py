"""Activation memory of LongVILA's transformer stacks: Megatron's recompute settings, and activation offload.

    RecomputeConfig            Megatron's recompute settings for one transformer stack (LLM or vision encoder)
    ActivationMemoryConfig     both stacks' recompute settings and the offload switch (what build_longvila takes)
    activation_memory_from_args(args) -> ActivationMemoryConfig    from parsed flags (either trainer's)
    ActivationOffload          saved-tensor hooks keeping a module's saved activations in host memory
    apply_activation_memory(model, config)   installs offload (and per-layer recompute where a stack runs its
                                             layers one by one) on a built LongVILAModel; build_longvila calls it
    OffloadError               a setting that cannot work; the message names the flag

Recompute is Megatron's own: the settings become the stacks' TransformerConfig fields (`recompute_granularity`,
`recompute_method`, `recompute_num_layers`, `recompute_modules`), which megatron-core's TransformerBlock
(full: `_checkpointed_forward`) and SelfAttention (selective "core_attn": `_checkpointed_attention_forward`)
read. MM-SP's collectives are autograd Functions called from the core attention, so a recomputed forward re-runs
the Ulysses all-to-alls and the ring exactly as the first forward did (same plan, same order on every rank).

Offload: megatron-core's own activation offloading (`cpu_offloading`) needs Transformer Engine, refuses pipeline
parallelism and refuses recompute; its fine-grained variant uses CUDA streams and events. Neither runs on this
project's CPU build, and the first would exclude the layouts long video needs. So `--cpu-offload-activations`
installs saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, as torch's save_on_cpu) around the forward
of each transformer stack (the LLM's decoder block and the encoder's block): every floating-point tensor autograd
saves there, except parameters, is copied to host memory when it is saved and copied back when the backward reads
it. Under full recompute what is saved there is each checkpoint's input, i.e. the layer inputs, so the layer inputs
live on the host between forward and backward. The copies are exact. On a CUDA build the host copies are pinned
and the copies asynchronous on the current stream (stream order keeps them safe without a host synchronization);
on the CPU build there is no pinned memory, and "host" is a second copy whose bytes are counted
(`ActivationOffload.stats`), which is how the CPU tests see what leaves the device side.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ..attention.megatron_core import is_plan_rope_table
from ..errors import OffloadError
from ..runtime.modules import unwrap_model
from ..runtime.probes import te_available

__all__ = ["RecomputeConfig", "ActivationMemoryConfig", "activation_memory_from_args", "ActivationOffload",
           "OffloadStats", "apply_activation_memory", "offload_block", "offloads_of", "OffloadError",
           "RECOMPUTE_MODULES"]


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""Megatron's selective-recompute modules that exist in LongVILA's dense layers (the MoE and MLA ones do not)."""


@dataclass(kw_only=True, frozen=True)
class RecomputeConfig:
    """Megatron's activation-recompute settings for one transformer stack (flag names in `flag_prefix`)."""

    granularity: Optional[str] = None
    """None (save everything), "full" (keep only checkpoint inputs, re-run whole layers in the backward) or
    "selective" (re-run only `modules` inside each layer)."""
    method: Optional[str] = None
    """With "full": "uniform" (checkpoint every group of `num_layers` consecutive layers) or "block" (checkpoint the
    first `num_layers` layers of each pipeline stage, keep the rest)."""
    num_layers: Optional[int] = None
    """With "full": the group size (uniform) or the number of recomputed layers per stage (block)."""
    modules: Tuple[str, ...] = ("core_attn",)
    """With "selective": which parts of a layer are recomputed (RECOMPUTE_MODULES)."""
    flag_prefix: str = "--recompute"
    """How the flags are spelled in messages ("--recompute" for the LLM, "--vision-recompute" for the encoder)."""

    def validate(self, layers: Optional[int], what: str, linear_bias: bool = False) -> None:
        """Check the settings against a stack of `layers` layers per pipeline stage (None: not known yet, at flag
        parsing; `linear_bias`: its linear layers have biases); raise OffloadError."""
        f = self.flag_prefix
        g = self.granularity
        if g not in (None, "full", "selective"):
            raise OffloadError(f"{f}-granularity {g}: choose full or selective")
        if g is None:
            if self.method is not None or self.num_layers is not None:
                raise OffloadError(f"{f}-method / {f}-num-layers without {f}-granularity full: give "
                                   f"{f}-granularity full (or drop them)")
            return
        if g == "selective":
            if self.method is not None or self.num_layers is not None:
                raise OffloadError(f"{f}-granularity selective recomputes {f}-modules in every layer: drop "
                                   f"{f}-method and {f}-num-layers (they are for full recompute)")
            bad = sorted(set(self.modules) - set(RECOMPUTE_MODULES))
            if bad or not self.modules:
                raise OffloadError(f"{f}-modules {' '.join(self.modules) or '(none)'}: {what} has "
                                   f"{', '.join(RECOMPUTE_MODULES)}")
            if "mlp" in self.modules and linear_bias:
                # megatron-core 0.16.1 checkpoints the MLP module, which returns its fc2 bias (a parameter) unadded;
                # the checkpoint then makes that parameter one of its outputs and the backward recurses forever.
                raise OffloadError(f"{f}-modules mlp: the {what}'s MLP has a bias, which megatron-core 0.16.1's MLP "
                                   f"recompute cannot take (its backward never ends); use core_attn or full recompute")
            if "layernorm" in self.modules and not te_available():
                # megatron-core 0.16.1's CheckpointWithoutOutput() takes fp8=False for "fp8 on" (`fp8 is not None`)
                # and then calls Transformer Engine's FP8GlobalStateManager: without TE the first forward fails.
                raise OffloadError(f"{f}-modules layernorm needs Transformer Engine with megatron-core 0.16.1 (its "
                                   f"norm checkpoint calls TE unconditionally); drop layernorm from {f}-modules")
            return
        if self.method not in ("uniform", "block"):
            raise OffloadError(f"{f}-granularity full needs {f}-method uniform or block, got {self.method}")
        n = self.num_layers
        if n is None or n < 1:
            raise OffloadError(f"{f}-granularity full needs {f}-num-layers >= 1 (layers per checkpoint for "
                               f"uniform, recomputed layers per stage for block)")
        if layers is None:
            return
        if self.method == "uniform" and layers % n:
            raise OffloadError(f"{f}-method uniform with {f}-num-layers {n}: the {what} has {layers} layers per "
                               f"pipeline stage, not a multiple of {n}; choose a divisor of {layers}")
        if self.method == "block" and n > layers:
            raise OffloadError(f"{f}-method block with {f}-num-layers {n}: the {what} has only {layers} layers per "
                               f"pipeline stage; give at most {layers}")

    def transformer_config_fields(self) -> dict:
        """The TransformerConfig fields megatron-core reads."""
        if self.granularity is None:
            return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
        out = {"recompute_granularity": self.granularity, "recompute_method": self.method,
               "recompute_num_layers": self.num_layers}
        if self.granularity == "selective":
            out["recompute_modules"] = list(self.modules)
        return out

    def recomputed_layers(self, layers: int) -> int:
        """How many of a stage's `layers` layers keep only their input (full recompute)."""
        if self.granularity != "full":
            return 0
        return layers if self.method == "uniform" else min(self.num_layers, layers)

    def flags(self) -> list:
        """These settings as command-line flags."""
        if self.granularity is None:
            return []
        f = self.flag_prefix
        out = [f"{f}-granularity", self.granularity]
        if self.granularity == "full":
            out += [f"{f}-method", self.method, f"{f}-num-layers", str(self.num_layers)]
        elif tuple(self.modules) != ("core_attn",):
            out += [f"{f}-modules", *self.modules]
        return out

    @property
    def label(self) -> str:
        """Short name for tables: none, selective(core_attn), full-uniform-1, ..."""
        if self.granularity is None:
            return "none"
        if self.granularity == "selective":
            return f"selective({'+'.join(self.modules)})"
        return f"full-{self.method}-{self.num_layers}"


@dataclass(kw_only=True, frozen=True)
class ActivationMemoryConfig:
    """How LongVILA keeps (or does not keep) activations for the backward."""

    llm: RecomputeConfig = field(default_factory=RecomputeConfig)
    """The LLM's recompute (Megatron's --recompute-* flags)."""
    vision: RecomputeConfig = field(default_factory=lambda: RecomputeConfig(flag_prefix="--vision-recompute"))
    """The vision encoder's recompute (--vision-recompute-*; by default the LLM's settings)."""
    offload: bool = False
    """--cpu-offload-activations: keep what the LLM's and the encoder's transformer blocks save for the backward in
    host memory between forward and backward."""

    @property
    def label(self) -> str:
        out = self.llm.label
        if self.vision.label != self.llm.label:
            out += f"/vision:{self.vision.label}"
        return out + ("+offload" if self.offload else "")

    def flags(self) -> list:
        out = self.llm.flags()
        v = self.vision.flags()
        same = [x.replace("--recompute", "--vision-recompute") if x.startswith("--") else x for x in out]
        if v != same:
            out += v if v else ["--vision-recompute-granularity", "none"]
        return out + (["--cpu-offload-activations"] if self.offload else [])


def _recompute_of(args, prefix: str, flag_prefix: str, default: Optional[RecomputeConfig] = None) -> RecomputeConfig:
    g = getattr(args, f"{prefix}recompute_granularity", None)
    if g is None and default is not None:
        return replace(default, flag_prefix=flag_prefix)
    if g == "none":
        return RecomputeConfig(flag_prefix=flag_prefix)
    modules = getattr(args, f"{prefix}recompute_modules", None)
    return RecomputeConfig(granularity=g, method=getattr(args, f"{prefix}recompute_method", None),
                           num_layers=getattr(args, f"{prefix}recompute_num_layers", None),
                           modules=tuple(modules) if modules else ("core_attn",), flag_prefix=flag_prefix)


def activation_memory_from_args(args) -> ActivationMemoryConfig:
    """The settings of a parsed command line (the project loop's or megatron.training's, same flag names).

    The encoder takes the LLM's recompute unless --vision-recompute-granularity says otherwise ("none" turns it
    off for the encoder alone)."""
    llm = _recompute_of(args, "", "--recompute")
    vision = _recompute_of(args, "vision_", "--vision-recompute", default=llm)
    if getattr(args, "vision_recompute_granularity", None) is None:
        # --vision-recompute-method / -num-layers refine the inherited settings.
        m = getattr(args, "vision_recompute_method", None)
        n = getattr(args, "vision_recompute_num_layers", None)
        if m is not None or n is not None:
            vision = replace(vision, method=m if m is not None else vision.method,
                             num_layers=n if n is not None else vision.num_layers)
    return ActivationMemoryConfig(llm=llm, vision=vision, offload=bool(getattr(args, "cpu_offload_activations",
                                                                             False)))


# ----------------------------------------------------------------------------------------------------------------
# Offload
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class OffloadStats:
    """What one ActivationOffload moved (this process, since the last reset)."""

    bytes_offloaded: int = 0
    """Bytes copied to host memory in forwards."""
    tensors_offloaded: int = 0
    """Tensors copied to host memory."""
    bytes_reloaded: int = 0
    """Bytes copied back for backwards."""
    bytes_kept: int = 0
    """Bytes of (distinct) saved tensors left on the device side: the rotary table and integer tensors."""
    bytes_on_host: int = 0
    """Host bytes held now (copies whose backward has not read them yet)."""
    peak_bytes_on_host: int = 0
    """Most host bytes held at once."""

    def reset(self) -> None:
        self.bytes_offloaded = self.tensors_offloaded = self.bytes_reloaded = self.bytes_kept = 0
        self.bytes_on_host = self.peak_bytes_on_host = 0


class _HostCopy:
    """One saved tensor in host memory (shared by every autograd node that saved the same tensor)."""

    __slots__ = ("host", "device", "nbytes", "stats", "reloaded", "source", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, nbytes: int, stats: OffloadStats, source):
        self.host, self.device, self.nbytes, self.stats = host, device, nbytes, stats
        self.reloaded = None  # weak reference to the device copy the backward is using
        self.source = source  # weak reference to the device storage it was copied from

    def __del__(self):  # the last autograd node that saved it is gone: the host copy is freed
        try:
            self.stats.bytes_on_host -= self.nbytes
        except Exception:
            pass


class ActivationOffload:
    """Saved-tensor hooks that keep what a module saves for the backward in host memory.

    `context()` wraps one forward: tensors saved inside it are copied to host memory (parameters and
    non-floating-point tensors are left alone: the former stay resident anyway, the latter are the plan's small
    index tensors, also kept by the plan; the rotary table is shared by all layers). Inside a backward (a recomputed forward) nothing is offloaded: those
    tensors live only for the recomputed layer's own backward.
    """

    def __init__(self, module: torch.nn.Module, name: str):
        self.name = name
        self.stats = OffloadStats()
        self._module = weakref.ref(module)
        self._params: set = set()
        # Tensors saved twice in one forward share one host copy; weak, so a copy lives only as long as the autograd
        # nodes that saved it.
        self._seen: "weakref.WeakValueDictionary[tuple, _HostCopy]" = weakref.WeakValueDictionary()
        self._kept: set = set()
        self.pin = torch.cuda.is_available()

    def _param_storages(self) -> set:
        m = self._module()
        return {p.untyped_storage().data_ptr() for p in m.parameters()} | \
               {b.untyped_storage().data_ptr() for b in m.buffers()} if m is not None else set()

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self._kept:
            self._kept.add(s.data_ptr())
            self.stats.bytes_kept += s.nbytes()
        return t

    def pack(self, t: torch.Tensor):
        if t.numel() == 0 or torch._C._current_graph_task_id() != -1:
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._params:
            return t  # parameters stay resident anyway
        if not t.is_floating_point() or is_plan_rope_table(t):
            # Index tensors are small and the plan keeps them; the rotary table is one tensor every layer of the
            # forward shares (and MM-SP attention recognises it by its storage).
            return self._keep(t)
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
        hit = self._seen.get(key)
        if hit is not None and not hit.source.expired():
            # The same live tensor saved again. (Once its device storage is freed, the address may hold a new tensor
            # of the same shape: the weak reference tells the two apart.)
            return hit
        nbytes = t.numel() * t.element_size()
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin)
            host.copy_(t, non_blocking=self.pin)
        else:
            # The CPU build: a separate copy stands for host memory. Made outside dispatch modes, so a device-memory
            # tracker on the CPU (planning.measure) does not see it, as CUDA's allocator never sees pinned host memory.
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                host = t.detach().clone()
        s = self.stats
        s.bytes_offloaded += nbytes
        s.tensors_offloaded += 1
        s.bytes_on_host += nbytes
        s.peak_bytes_on_host = max(s.peak_bytes_on_host, s.bytes_on_host)
        copy = _HostCopy(host, t.device, nbytes, s, StorageWeakRef(t.untyped_storage()))
        self._seen[key] = copy
        return copy

    def unpack(self, saved):
        if not isinstance(saved, _HostCopy):
            return saved
        dev = saved.reloaded() if saved.reloaded is not None else None
        if dev is None:
            if saved.device.type == "cuda":
                dev = saved.host.to(saved.device, non_blocking=True)
            else:
                dev = saved.host.clone()  # a fresh "device" copy, as a GPU run would make
            saved.reloaded = weakref.ref(dev)
            self.stats.bytes_reloaded += saved.nbytes
        return dev

    def context(self):
        """Saved-tensor hooks for one forward of the module."""
        self._params = self._param_storages()
        self._seen = weakref.WeakValueDictionary()  # only within one forward: a later forward's tensors are new
        self._kept = set()
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


_OFFLOADED_CLASSES: Dict[type, type] = {}


def _offloaded_class(base: type) -> type:
    """`base` with its forward inside the module's offload context (a subclass, so copies and pickles of the
    module keep calling their own forward)."""
    cls = _OFFLOADED_CLASSES.get(base)
    if cls is None:
        def forward(self, *args, **kwargs):
            off = self._longvila_offload
            if not (torch.is_grad_enabled() and self.training):
                return super(cls, self).forward(*args, **kwargs)
            with off.context():
                return super(cls, self).forward(*args, **kwargs)

        cls = type(f"Offloaded{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
        _OFFLOADED_CLASSES[base] = cls
    return cls


def offload_block(module: torch.nn.Module, name: str) -> ActivationOffload:
    """Keep what `module`'s training forward saves for the backward in host memory (idempotent); returns its
    ActivationOffload. apply_activation_memory calls it for the LLM's and the encoder's transformer blocks; tools
    call it on a bare block."""
    off = getattr(module, "_longvila_offload", None)
    return off if off is not None else _install_offload(module, name)


def _install_offload(module: torch.nn.Module, name: str) -> ActivationOffload:
    off = ActivationOffload(module, name)
    module._longvila_offload = off
    module.__class__ = _offloaded_class(type(module))
    return off


def offloads_of(model) -> Dict[str, ActivationOffload]:
    """The ActivationOffload of each stack of a built model ({"llm": ..., "vision": ...}; absent when off)."""
    out = {}
    for name, mod in _stacks(model).items():
        off = getattr(mod, "_longvila_offload", None) if mod is not None else None
        if off is not None:
            out[name] = off
    return out


def _stacks(model) -> Dict[str, Optional[torch.nn.Module]]:
    model = unwrap_model(model)
    lm = getattr(getattr(model, "language_model", None), "model", None)
    vis = getattr(model, "vision_model", None)
    return {"llm": getattr(lm, "decoder", None), "vision": getattr(vis, "decoder", None)}


# ----------------------------------------------------------------------------------------------------------------
# Per-layer recompute for an encoder that runs its layers one by one
# ----------------------------------------------------------------------------------------------------------------

_CHECKPOINTED_CLASSES: Dict[type, type] = {}


def _checkpointed_layer_class(base: type) -> type:
    """A TransformerLayer whose training forward is one megatron-core checkpoint (full recompute of the layer)."""
    cls = _CHECKPOINTED_CLASSES.get(base)
    if cls is None:
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            if not (self.training and torch.is_grad_enabled()):
                return super(cls, self).forward(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
            from megatron.core import tensor_parallel

            def run(h, mask):
                return super(cls, self).forward(hidden_states=h, attention_mask=mask, **kwargs)

            return tensor_parallel.checkpoint(run, False, hidden_states, attention_mask)

        cls = type(f"Checkpointed{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
        _CHECKPOINTED_CLASSES[base] = cls
    return cls


def apply_activation_memory(model, config: ActivationMemoryConfig):
    """Install what the TransformerConfigs cannot express on a built LongVILAModel (build_longvila calls it).

    - offload: saved-tensor hooks around the LLM's decoder block and the encoder's block;
    - an encoder that runs only its first layers (VisionConfig.select_layer, as VILA runs SigLIP) calls them one by
      one instead of through its TransformerBlock, which is where megatron-core applies full recompute: its layers
      chosen by the settings are checkpointed one by one here ("uniform" groups of more than one layer cannot be
      formed that way and are refused at build time).
    """
    stacks = _stacks(model)
    vis = getattr(model, "vision_model", None)
    if vis is not None and config.vision.granularity == "full":
        run = vis.cfg.layers_run
        if run < len(vis.decoder.layers):
            if config.vision.method == "uniform" and config.vision.num_layers != 1:
                raise OffloadError(f"--vision-recompute-method uniform with --vision-recompute-num-layers "
                                   f"{config.vision.num_layers}: this encoder runs its first {run} layers one by "
                                   f"one (select_layer {vis.cfg.select_layer}), so only single-layer checkpoints "
                                   f"exist; use --vision-recompute-num-layers 1 or --vision-recompute-method block")
            for layer in vis.decoder.layers[:config.vision.recomputed_layers(run)]:
                layer.__class__ = _checkpointed_layer_class(type(layer))
    if config.offload:
        for name, mod in stacks.items():
            if mod is not None and getattr(mod, "_longvila_offload", None) is None:
                _install_offload(mod, name)
    return model

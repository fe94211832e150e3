"""megatron-core's Transformer Engine layers by name, for the layer specs.

    te_class(name, *, describe=False) -> type
    describe_spec(spec) -> {submodule path: "module.Class"}
    transformer_config(*, describe=False, **fields) -> TransformerConfig   (TE-only checks deferred when describing)

A spec that uses Transformer Engine needs TE's classes, and importing them needs TE (CUDA, cuDNN). A dry run of a
launch that asks for TE must still name the modules the target machine would build: with describe=True and TE not
importable here, `te_class` returns a stand-in that carries the class's module and name and refuses to be built.
"""

from __future__ import annotations

from typing import Dict

from megatron.core.transformer.transformer_config import TransformerConfig

from ..runtime.probes import te_available

__all__ = ["te_class", "describe_spec", "transformer_config", "TE_ONLY_FIELDS", "TE_MODULE"]

TE_MODULE = "megatron.core.extensions.transformer_engine"
"""Where megatron-core keeps its Transformer Engine layers."""

_STANDINS: Dict[str, type] = {}


class _NotBuilt:
    """A Transformer Engine class named in a dry run where TE does not import: describing only, never built."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__module__}.{type(self).__name__} was named for a dry run: Transformer "
                           f"Engine does not import here, so it cannot be built")


def te_class(name: str, *, describe: bool = False) -> type:
    """megatron-core's TE layer `name` (TELayerNormColumnParallelLinear, TERowParallelLinear, TEDotProductAttention,
    TEColumnParallelLinear, TENorm). With describe=True where TE does not import, a stand-in with its name."""
    if describe and not te_available():
        if name not in _STANDINS:
            _STANDINS[name] = type(name, (_NotBuilt,), {"__module__": TE_MODULE})
        return _STANDINS[name]
    import importlib

    return getattr(importlib.import_module(TE_MODULE), name)


def _name(obj) -> str:
    if isinstance(obj, type) or callable(obj):
        module = getattr(obj, "__module__", "") or ""
        return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"
    return repr(obj)


def describe_spec(spec, prefix: str = "") -> Dict[str, str]:
    """The classes a ModuleSpec builds, by submodule path ("", "self_attention", "self_attention.linear_qkv", ...)."""
    out: Dict[str, str] = {}
    module = getattr(spec, "module", spec)
    out[prefix or "module"] = _name(module)
    sub = getattr(spec, "submodules", None)
    if sub is None:
        return out
    fields = getattr(sub, "__dataclass_fields__", None)
    names = list(fields) if fields else [k for k in vars(sub) if not k.startswith("_")]
    for field in names:
        value = getattr(sub, field, None)
        if value is None or isinstance(value, dict):
            continue
        path = f"{prefix}.{field}" if prefix else field
        if hasattr(value, "module") or hasattr(value, "submodules"):
            out.update(describe_spec(value, path))
        else:
            out[path] = _name(value)
    return out


TE_ONLY_FIELDS = ("transformer_impl", "fp8", "fp8_recipe", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
                  "fp8_amax_compute_algo", "fp8_dot_product_attention", "apply_rope_fusion",
                  "cross_entropy_fusion_impl")
"""TransformerConfig fields whose checks need Transformer Engine where they are built (a dry run sets them after)."""


def transformer_config(*, describe: bool = False, **kwargs) -> TransformerConfig:
    """megatron-core's TransformerConfig; with describe=True (a dry run on a machine that is not the target), the
    fields of TE_ONLY_FIELDS are set after construction, so megatron-core's checks that need TE or CUDA do not run
    here (the target runs them when it builds the model)."""
    given = set(kwargs)
    later = {k: kwargs.pop(k) for k in TE_ONLY_FIELDS if k in kwargs} if describe else {}
    cfg = TransformerConfig(**kwargs)
    for k, v in later.items():
        setattr(cfg, k, v)
    cfg._longvila_given = given  # the fields the builder set (a dry run tells them from megatron-core's derived ones)
    return cfg

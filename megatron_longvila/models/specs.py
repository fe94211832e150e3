"""GPT layer specs with MM-SP attention (Llama/Qwen2 style), and the registry behind Megatron's `--spec`.

Public API:
    get_gpt_mmsp_layer_spec(backend="auto") -> ModuleSpec
        Megatron's GPT TransformerLayer with MMSPSelfAttention + MMSPCoreAttention. RMSNorm or LayerNorm
        (config.normalization), SwiGLU (config.gated_linear_unit + silu), RoPE, GQA (num_query_groups) and
        QKV bias (config.add_qkv_bias) all come from the TransformerConfig, as in Megatron's own specs.
        backend: "te" (TE linear/norm layers, TE fused attention in the ring, FP8 attention when the config
        asks), "local" (Megatron's own layers, runs anywhere), "auto" (te when Transformer Engine imports).
    get_gpt_te_cp_layer_spec() -> ModuleSpec
        the baseline: Megatron's TE layer spec, whose TEDotProductAttention runs TE's a2a+p2p CP.
    validate_layer_spec(spec, config)     start-up checks of a spec against the config (norms under SP, ...)
    LocalNorm                             RMSNorm/LayerNorm that supports TP sequence parallelism
    SPECS                                 registry: name -> spec function
    gpt_mmsp, gpt_mmsp_local, gpt_te_cp   ModuleSpec values for `--spec megatron_longvila.models.specs NAME`

Megatron's `--spec MODULE NAME` reads `vars(module)[NAME]` and uses it as the layer spec, so each registry
entry is also materialized as a module attribute at import. `gpt_te_cp` (and `gpt_mmsp` pinned to TE)
cannot exist without Transformer Engine: there the attribute is a spec whose construction raises with the
reason, since a missing name would surface as an obscure KeyError inside Megatron.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ..attention.megatron_core import MMSPCoreAttention, MMSPSelfAttention
from ..errors import MMSPConfigError
from ..runtime.probes import te_available
from .te_classes import te_class

__all__ = ["get_gpt_mmsp_layer_spec", "get_gpt_te_cp_layer_spec", "validate_layer_spec", "LocalNorm",
           "MMSPTECoreAttention", "SPECS", "gpt_mmsp", "gpt_mmsp_local", "gpt_te_cp"]


class LocalNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (config.normalization) built from Megatron's layer-norm arguments.

    Unlike torch's norms (Megatron's WrappedTorchNorm), it supports TP sequence parallelism: its parameters
    carry `sequence_parallel`, so Megatron's finalize_model_grads all-reduces their gradients over TP (each
    TP rank only saw its slice of the sequence).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise MMSPConfigError(f"--normalization {config.normalization}: the MM-SP local spec has RMSNorm and "
                                  f"LayerNorm")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise MMSPConfigError("--apply-layernorm-1p is not supported by the local MM-SP spec; use the TE spec")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            if p is not None:
                setattr(p, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


class MMSPTECoreAttention(MMSPCoreAttention):
    """MMSPCoreAttention with Transformer Engine's fused attention as the local kernel inside the ring."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("backend", "te")
        super().__init__(*args, **kwargs)


class _Unavailable(torch.nn.Module):
    """Placeholder layer for specs that need a missing dependency: building it raises the reason."""

    reason = ""

    def __init__(self, *args, **kwargs):
        raise MMSPConfigError(self.reason)


def _unavailable(reason: str) -> ModuleSpec:
    cls = type("UnavailableLayer", (_Unavailable,), {"reason": reason})
    return ModuleSpec(module=cls)


_NO_TE = ("Transformer Engine does not import here (it needs CUDA, NCCL and cuDNN); use --spec "
          "megatron_longvila.models.specs gpt_mmsp_local, or install transformer-engine on a CUDA machine")


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "te", "local"):
        raise MMSPConfigError(f"layer spec backend {backend!r}: choose auto, te or local")
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise MMSPConfigError(_NO_TE)
    return backend


def get_gpt_mmsp_layer_spec(backend: str = "auto", *, describe: bool = False) -> ModuleSpec:
    """Megatron GPT layer with MM-SP context-parallel attention (see the module docstring).

    describe: a dry run's spec, which names TE's classes without importing TE where it does not import (never built).
    """
    if describe and backend == "te":
        pass  # named, not built: TE need not import here
    else:
        backend = _resolve_backend(backend)
    if backend == "te":
        TELayerNormColumnParallelLinear = te_class("TELayerNormColumnParallelLinear", describe=describe)
        TERowParallelLinear = te_class("TERowParallelLinear", describe=describe)

        # TE fuses the pre-attention and pre-MLP norms into the following linear layer.
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=IdentityOp,
                self_attention=ModuleSpec(
                    module=MMSPSelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(linear_qkv=TELayerNormColumnParallelLinear,
                                                       core_attention=MMSPTECoreAttention,
                                                       linear_proj=TERowParallelLinear,
                                                       q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=IdentityOp,
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                    linear_fc2=TERowParallelLinear)),
                mlp_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map={},
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=MMSPSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=MMSPCoreAttention,
                                                   linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                                   k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LocalNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as Megatron's TE spec, so checkpoints move between the two backends.
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


def get_gpt_te_cp_layer_spec() -> ModuleSpec:
    """Baseline: Megatron's TE GPT layer; with --cp-comm-type a2a+p2p and hierarchical sizes, TE's own CP."""
    if not te_available():
        raise MMSPConfigError(_NO_TE)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def validate_layer_spec(spec: ModuleSpec, config, *, final_norm=None) -> None:
    """Start-up checks of a layer spec against the config; raise MMSPConfigError naming the fix.

    final_norm: the block's final norm when the caller supplies one; None means Megatron's default for a
    bare layer spec (its LayerNormImpl), which is checked too.
    """
    sub = getattr(spec, "submodules", None)
    attn = getattr(sub, "self_attention", None)
    attn_cls = getattr(attn, "module", None)
    core = getattr(getattr(attn, "submodules", None), "core_attention", None)
    is_mmsp = isinstance(attn_cls, type) and issubclass(attn_cls, MMSPSelfAttention)
    if config.context_parallel_size > 1 and isinstance(core, type) and issubclass(core, MMSPCoreAttention) \
            and not is_mmsp:
        raise MMSPConfigError("MMSPCoreAttention inside Megatron's SelfAttention applies RoPE in Megatron's CP layout; "
                              "use get_gpt_mmsp_layer_spec() (MMSPSelfAttention) instead of a hand-made spec")
    if config.sequence_parallel:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megatron.core.transformer import transformer_block

        norms = {name: getattr(sub, name, None) for name in ("input_layernorm", "pre_mlp_layernorm")}
        norms["final_layernorm"] = final_norm or getattr(transformer_block, "LayerNormImpl", None)
        for name, norm in norms.items():
            norm = getattr(norm, "module", norm)
            if norm is WrappedTorchNorm or norm in (torch.nn.RMSNorm, torch.nn.LayerNorm):
                raise MMSPConfigError(
                    f"--sequence-parallel with {name} = {getattr(norm, '__name__', norm)}: torch's norms do not "
                    f"mark their weights for sequence parallelism (gradients would miss the other TP ranks' tokens); "
                    f"use get_gpt_mmsp_layer_spec() (LocalNorm or TE norms) or drop --sequence-parallel")


SPECS: Dict[str, Callable[[], ModuleSpec]] = {
    "gpt_mmsp": lambda: get_gpt_mmsp_layer_spec("auto"),
    "gpt_mmsp_local": lambda: get_gpt_mmsp_layer_spec("local"),
    "gpt_mmsp_te": lambda: get_gpt_mmsp_layer_spec("te"),
    "gpt_te_cp": get_gpt_te_cp_layer_spec,
}


def _materialize(name: str) -> ModuleSpec:
    try:
        return SPECS[name]()
    except MMSPConfigError as e:
        return _unavailable(f"--spec megatron_longvila.models.specs {name}: {e}")


gpt_mmsp = _materialize("gpt_mmsp")
gpt_mmsp_local = _materialize("gpt_mmsp_local")
gpt_mmsp_te = _materialize("gpt_mmsp_te")
gpt_te_cp = _materialize("gpt_te_cp")

"""LongVILA's `mlp_downsample` projector: 2x2 space-to-channel, LayerNorm, Linear, GELU, Linear.

Each 2x2 block of neighbouring patch features becomes one token of 4x the width (channel order: row in
the block, column in the block, feature), which quarters the visual tokens. Odd grids are padded with
zero features at the bottom and right first (SigLIP at 384 px: 27x27 -> 28x28 -> 14x14 = 196 tokens).

Token order over the downsampled grid (`ProjectorConfig.token_order`): "row_major" (token = block row x width
+ block column; VILA since Dec 2024, and what its `mlp_downsample_2x2_fix` means) or "column_major" (VILA's 2024
code, without the final transpose). Checkpoints record theirs (models.record); `set_token_order` changes it on a
built projector and announces the order once per process.

The two linears are a megatron-core MLP (column-parallel then row-parallel), so with tensor parallelism
the hidden activation is split over TP ranks and the output is replicated on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from ..errors import ProjectorError
from ..runtime.entry import rank
from ..runtime.probes import te_available
from .te_classes import te_class, transformer_config


TOKEN_ORDERS = ("row_major", "column_major")
"""Orders of the projector's output tokens over the downsampled grid."""


def space_to_channel_2x2(x: torch.Tensor, rows: int, cols: int, order: str = "row_major") -> torch.Tensor:
    """[n, rows*cols, C] -> [n, ceil(rows/2)*ceil(cols/2), 4C], zero-padding odd sides at the end (a zero row at
    the bottom, a zero column at the right). Channels: top-left, top-right, bottom-left, bottom-right patch;
    tokens in `order` over the 2x2 blocks."""
    n, s, c = x.shape
    if s != rows * cols:
        raise ProjectorError(f"{s} patch features do not form a {rows}x{cols} grid")
    if order not in TOKEN_ORDERS:
        raise ProjectorError(f"token order {order!r}: choose one of {TOKEN_ORDERS}")
    x = x.reshape(n, rows, cols, c)
    x = F.pad(x, (0, 0, 0, cols % 2, 0, rows % 2))
    r2, c2 = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, r2, 2, c2, 2, c)
    if order == "row_major":
        x = x.permute(0, 1, 3, 2, 4, 5)  # [n, r2, c2, dy, dx, C]
    else:
        x = x.permute(0, 3, 1, 2, 4, 5)  # [n, c2, r2, dy, dx, C]
    return x.reshape(n, r2 * c2, 4 * c)


_ANNOUNCED = set()


def announce_token_order(order: str, why: str) -> None:
    """Log the projector's token order once per run (per order and reason): every rank knows it alike, so rank 0
    says it."""
    import logging

    if (order, why) not in _ANNOUNCED:
        _ANNOUNCED.add((order, why))
        if rank() == 0:
            logging.getLogger("megatron_longvila.models").warning("projector token order: %s (%s)", order, why)


@dataclass(kw_only=True)
class ProjectorConfig:
    """Shape of the mlp_downsample projector."""

    vision_hidden_size: int
    """Width of the encoder's patch features (C); the projector's input is 4C."""
    llm_hidden_size: int
    """Width of the LLM's token embeddings (the output, and the inner width)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the LayerNorm on the 4C features."""
    token_order: str = "row_major"
    """Order of the output tokens over the downsampled grid (TOKEN_ORDERS; see the module docstring)."""

    def __post_init__(self):
        if self.token_order not in TOKEN_ORDERS:
            raise ProjectorError(f"token_order {self.token_order!r}: choose one of {TOKEN_ORDERS}")


def projector_transformer_config(cfg: ProjectorConfig, *, tensor_model_parallel_size: int = 1,
                                 params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                                 init_method_std: float = 0.02, **overrides) -> TransformerConfig:
    """The megatron-core config of the projector's MLP (GELU, biases, no gating, no fusions)."""
    kwargs = dict(
        num_layers=1, hidden_size=cfg.llm_hidden_size, ffn_hidden_size=cfg.llm_hidden_size,
        # The projector has no attention; megatron still checks heads against the TP size.
        num_attention_heads=tensor_model_parallel_size, add_bias_linear=True, gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=use_cpu_initialization, tensor_model_parallel_size=tensor_model_parallel_size,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, init_method_std=init_method_std,
        layernorm_epsilon=cfg.layernorm_epsilon, hidden_dropout=0.0, attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return transformer_config(**kwargs)


@dataclass
class ProjectorSubmodules:
    """What the projector is made of."""

    layernorm: object = WrappedTorchNorm
    """Norm over the 4C space-to-channel features."""
    mlp: object = None
    """ModuleSpec of the MLP (4C -> llm hidden -> llm hidden)."""


def mlp_downsample_spec(use_te: bool = False, *, describe: bool = False) -> ModuleSpec:
    """Spec of the projector with local (or TE) linears (describe: a dry run's, naming TE's classes only)."""
    if use_te:
        if not describe and not te_available():
            raise ProjectorError("the TE projector spec needs Transformer Engine (transformer_engine.pytorch), which is "
                                 "not importable here: use use_te=False (megatron-core local layers) or install TE on "
                                 "a CUDA machine")
        fc1, fc2, norm = (te_class(n, describe=describe) for n in ("TEColumnParallelLinear", "TERowParallelLinear",
                                                                   "TENorm"))
    else:
        fc1, fc2, norm = ColumnParallelLinear, RowParallelLinear, WrappedTorchNorm
    return ModuleSpec(module=MlpDownsampleProjector,
                      submodules=ProjectorSubmodules(layernorm=norm,
                                                     mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                                                         linear_fc1=fc1, linear_fc2=fc2))))


class MlpDownsampleProjector(MegatronModule):
    """Patch features [n, rows*cols, C] -> LLM tokens [n, ceil(rows/2)*ceil(cols/2), llm_hidden]."""

    def __init__(self, config: TransformerConfig, submodules: ProjectorSubmodules, cfg: ProjectorConfig,
                 tp_group=None):
        super().__init__(config=config)
        if config.hidden_size != cfg.llm_hidden_size:
            raise ProjectorError("projector config hidden_size must equal ProjectorConfig.llm_hidden_size")
        if submodules.mlp is None:
            raise ProjectorError("ProjectorSubmodules.mlp is required (use mlp_downsample_spec())")
        self.cfg = cfg
        in_size = 4 * cfg.vision_hidden_size
        # The norm's width is 4C, not the config's hidden size.
        self.layernorm = build_module(submodules.layernorm, config=config, hidden_size=in_size,
                                      eps=cfg.layernorm_epsilon)
        if tp_group is None:
            from megatron.core import parallel_state

            tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        self.mlp = build_module(submodules.mlp, config=config, input_size=in_size, tp_group=tp_group)

    def set_token_order(self, order: str, why: str) -> None:
        """Use `order` for the output tokens from now on (e.g. the checkpoint's recorded order) and announce it."""
        if order not in TOKEN_ORDERS:
            raise ProjectorError(f"token order {order!r}: choose one of {TOKEN_ORDERS}")
        self.cfg.token_order = order
        announce_token_order(order, why)

    def forward(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        x = space_to_channel_2x2(features, rows, cols, self.cfg.token_order)
        n, t, c = x.shape
        x = self.layernorm(x)
        x = x.transpose(0, 1).contiguous()  # megatron linears take [s, b, h]
        out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return out.transpose(0, 1).contiguous()

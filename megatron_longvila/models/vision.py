"""SigLIP-style vision encoder built from Megatron-Core modules.

Patch embedding (a stride-`patch` convolution, with bias), learned position embeddings, no class token,
a `TransformerBlock` of pre-LayerNorm layers with bidirectional attention, and an optional post-LayerNorm.
Attention heads and MLP columns are split over the tensor-parallel group as in any Megatron layer. The
encoder does not use context parallelism: MM-SP gives each CP rank its own frames instead (stage 1).

Frames at a resolution other than the native one (e.g. a 448 px frame through a 384 px model, or the
28/56 px test frames) get their position embeddings resized bicubically to the frame's patch grid.

Layer specs: `vit_layer_spec(use_te=False)` is built from megatron-core's local modules (runs on CPU);
`use_te=True` uses Transformer Engine modules and raises a clear error when TE is not importable.
Unlike megatron-core's `get_vit_layer_with_local_spec` (causal mask), both specs use no mask: SigLIP
attends bidirectionally over the patches of one frame. Both store their layers under the TE spec's checkpoint
keys (the local spec maps its norms, VIT_LOCAL_KEYS_MAP), so checkpoints move between the two.

What VILA runs: `VisionConfig.select_layer` picks transformers' `hidden_states[select_layer]` (VILA: -2, the first
26 of SigLIP so400m's 27 layers, no post-LayerNorm, no pooling head). The layers after it, the post-LayerNorm
(when not applied) and the head (`VisionConfig.head`) stay in the model's state as buffers (`freeze_as_buffers`):
never run, never trained, never decayed, saved and loaded like weights, so every checkpoint exports back to VILA's
layout with every tensor it came with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from ..errors import VisionConfigError
from ..plan.frames import patch_grid
from ..runtime.probes import te_available
from .te_classes import te_class, transformer_config
from .vision_attention import BidirectionalSDPA


def _require_te(what: str) -> None:
    if not te_available():
        raise VisionConfigError(f"{what} needs Transformer Engine (transformer_engine.pytorch), which is not "
                                f"importable here: use use_te=False (megatron-core local layers) or install TE "
                                f"on a CUDA machine")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, SigLIP's activation."""
    return F.gelu(x, approximate="tanh")


@dataclass(kw_only=True)
class VisionConfig:
    """Shape of a SigLIP-style ViT. Presets live in `models.registry`."""

    image_size: int = 384
    """Native input size in pixels (square); position embeddings are learned for this grid."""
    patch_size: int = 14
    """Patch size in pixels (the embedding convolution's kernel and stride)."""
    hidden_size: int = 1152
    """Width of the encoder."""
    num_layers: int = 27
    """Transformer layers in the encoder's state (all of them are built; `select_layer` says how many run)."""
    num_attention_heads: int = 16
    """Attention heads (must divide by the tensor-parallel size)."""
    ffn_hidden_size: int = 4304
    """Inner width of the MLP."""
    layernorm_epsilon: float = 1e-6
    """LayerNorm epsilon."""
    post_layernorm: bool = True
    """The encoder has a post-LayerNorm (SigLIP's `post_layernorm`)."""
    activation: str = "gelu_tanh"
    """MLP activation: "gelu_tanh" (SigLIP) or "gelu"."""
    select_layer: int = -1
    """Hidden state that feeds the projector, counted as transformers' `hidden_states`: -1 is the last layer's
    output, -2 the one before (VILA's `mm_vision_select_layer`: SigLIP so400m runs 26 of its 27 layers). Layers
    after it stay in the state (loaded, saved, exported) but are frozen and never run."""
    apply_post_layernorm: bool = True
    """Run the post-LayerNorm on the last layer's output (select_layer -1 only). VILA never does: its feature is a
    raw hidden state, so its post-LayerNorm is kept in the state like the unused layers."""
    head: bool = False
    """The state holds SigLIP's attention-pooling head (probe, attention, LayerNorm, MLP): frozen, never run (VILA
    feeds patch features to the projector), kept so a checkpoint exports back with every tensor it came with."""

    def __post_init__(self):
        if not -self.num_layers <= self.select_layer <= -1:
            raise VisionConfigError(f"select_layer {self.select_layer}: choose -1 (the last of the {self.num_layers} "
                                    f"layers) down to {-self.num_layers}")
        if self.apply_post_layernorm and self.post_layernorm and self.select_layer != -1:
            raise VisionConfigError(f"select_layer {self.select_layer} with apply_post_layernorm: the post-LayerNorm "
                                    f"follows the last layer; set apply_post_layernorm=False (as VILA runs SigLIP)")
        if self.image_size < self.patch_size:
            raise VisionConfigError(f"image_size {self.image_size} is smaller than one {self.patch_size} px patch")
        if self.hidden_size % self.num_attention_heads:
            raise VisionConfigError(f"hidden_size {self.hidden_size} does not divide into "
                                    f"{self.num_attention_heads} heads")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise VisionConfigError(f"activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}")

    @property
    def layers_run(self) -> int:
        """Encoder layers the forward runs (the first ones): num_layers + 1 + select_layer."""
        return self.num_layers + 1 + self.select_layer

    @property
    def runs_post_layernorm(self) -> bool:
        """Whether the forward applies the post-LayerNorm."""
        return self.post_layernorm and self.apply_post_layernorm and self.select_layer == -1

    @property
    def grid(self) -> int:
        """Patches per side at the native size (384 px / 14 -> 27: the valid convolution drops the last 6 px)."""
        return self.image_size // self.patch_size


def vision_transformer_config(cfg: VisionConfig, *, tensor_model_parallel_size: int = 1,
                              params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                              init_method_std: float = 0.02, **overrides) -> TransformerConfig:
    """The megatron-core TransformerConfig of the encoder's layers.

    CP and PP are 1 by construction: MM-SP shards frames, not patches, and the encoder lives on the first
    pipeline stage. Fusions are off so the same config runs on CPU; override them for GPU runs.
    """
    kwargs = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        layernorm_epsilon=cfg.layernorm_epsilon, normalization="LayerNorm", add_bias_linear=True,
        add_qkv_bias=True, gated_linear_unit=False,
        activation_func=gelu_tanh if cfg.activation == "gelu_tanh" else F.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=1,
        context_parallel_size=1, sequence_parallel=False, params_dtype=params_dtype,
        pipeline_dtype=params_dtype, init_method_std=init_method_std, attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    return transformer_config(**kwargs)


def vit_layer_spec(use_te: bool = False, *, describe: bool = False) -> ModuleSpec:
    """Pre-norm ViT layer with bidirectional attention (no mask), local or Transformer Engine modules.

    describe: a dry run's spec, naming TE's classes without importing TE where it does not import (never built)."""
    if use_te:
        if not describe:
            _require_te("the TE ViT layer spec")
        TEDotProductAttention = te_class("TEDotProductAttention", describe=describe)
        TELayerNormColumnParallelLinear = te_class("TELayerNormColumnParallelLinear", describe=describe)
        TERowParallelLinear = te_class("TERowParallelLinear", describe=describe)

        # TE fuses the pre-norms into the following column-parallel linear.
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                self_attention=ModuleSpec(
                    module=SelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                    submodules=SelfAttentionSubmodules(linear_qkv=TELayerNormColumnParallelLinear,
                                                       core_attention=TEDotProductAttention,
                                                       linear_proj=TERowParallelLinear)),
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=IdentityOp,
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                    linear_fc2=TERowParallelLinear)),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                   core_attention=BidirectionalSDPA,
                                                   linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys of the TE spec (its norms live inside the fused linears), as Megatron's GPT local spec
            # does: a checkpoint saved with either spec loads into the other.
            sharded_state_dict_keys_map=dict(VIT_LOCAL_KEYS_MAP),
        ),
    )


VIT_LOCAL_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                      "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
"""Local-spec layer keys -> the TE spec's checkpoint keys (the same map as megatron-core's GPT local spec)."""


def freeze_as_buffers(module: torch.nn.Module) -> int:
    """Turn every parameter of `module` into a persistent buffer of the same name; returns the elements moved.

    For state that is kept but never run (the encoder layers after `select_layer`, an unused post-LayerNorm, the
    pooling head): buffers are saved, loaded, moved and cast with the module, but no optimizer, gradient buffer,
    weight decay or freezing preset ever sees them, so training leaves them bit-identical.
    """
    n = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach(), persistent=True)
            n += p.numel()
    return n


class SiglipHeadState(torch.nn.Module):
    """SigLIP's attention-pooling head as stored by transformers (`head.probe`, `head.attention.in_proj_*`,
    `head.attention.out_proj.*`, `head.layernorm.*`, `head.mlp.fc1/fc2.*`), held as buffers: LongVILA never runs
    it (the projector takes patch features), it is kept so checkpoints export back unchanged. Replicated over TP."""

    def __init__(self, cfg: "VisionConfig", dtype: torch.dtype):
        super().__init__()
        c, f = cfg.hidden_size, cfg.ffn_hidden_size

        def holder(**shapes):
            m = torch.nn.Module()
            for name, shape in shapes.items():
                m.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=True)
            return m

        self.register_buffer("probe", torch.zeros(1, 1, c, dtype=dtype), persistent=True)
        self.attention = holder(in_proj_weight=(3 * c, c), in_proj_bias=(3 * c,))
        self.attention.out_proj = holder(weight=(c, c), bias=(c,))
        self.layernorm = holder(weight=(c,), bias=(c,))
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = holder(weight=(f, c), bias=(f,))
        self.mlp.fc2 = holder(weight=(c, f), bias=(c,))

    def forward(self, *args, **kwargs):
        raise VisionConfigError("the SigLIP pooling head is stored, not run: LongVILA feeds patch features to the "
                                "projector")


def norm_impl(use_te: bool, *, describe: bool = False):
    """The standalone LayerNorm module (post-norm): TE's fused norm or a torch LayerNorm."""
    if use_te:
        if not describe:
            _require_te("the TE LayerNorm")
        return te_class("TENorm", describe=describe)
    return WrappedTorchNorm


def vision_process_groups(tp_group=None, pp_group=None) -> ProcessGroupCollection:
    """Process groups for the encoder: TP from the caller (default: Megatron's), never CP.

    `cp` is left None on purpose: the encoder has no rotary embeddings (the only CP use inside megatron-core's
    attention) and must not join the LLM's context-parallel collectives.
    """
    from megatron.core import parallel_state

    pgs = ProcessGroupCollection()
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if pp_group is None:
        pp_group = parallel_state.get_pipeline_model_parallel_group(check_initialized=False)
    if tp_group is None or pp_group is None:
        raise VisionConfigError("the vision encoder needs tensor- and pipeline-parallel groups: initialize "
                                "megatron.core.parallel_state (initialize_model_parallel) or pass pg_collection")
    pgs.tp = tp_group
    pgs.pp = pp_group
    pgs.cp = None
    return pgs


class SiglipVisionModel(VisionModule):
    """SigLIP-style ViT: frames [n, 3, H, W] -> patch features [n, (H/p)*(W/p), hidden].

    Args:
        cfg: encoder shape.
        transformer_config: megatron-core config of its layers (`vision_transformer_config(cfg)`).
        layer_spec: transformer layer spec (`vit_layer_spec(use_te)`).
        pg_collection: process groups (`vision_process_groups()`); cp must be None.
        use_te: build the post-norm from TE (must match the layer spec's choice).
    """

    def __init__(self, cfg: VisionConfig, transformer_config: TransformerConfig,
                 layer_spec: Optional[ModuleSpec] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 use_te: bool = False):
        super().__init__(config=transformer_config)
        if transformer_config.hidden_size != cfg.hidden_size or transformer_config.num_layers != cfg.num_layers:
            raise VisionConfigError("transformer_config does not match the VisionConfig (hidden size / layers)")
        if transformer_config.context_parallel_size != 1:
            raise VisionConfigError("the vision encoder's config must have context_parallel_size=1: MM-SP shards "
                                    "frames over CP ranks, each rank encodes whole frames")
        self.cfg = cfg
        self.pg_collection = pg_collection if pg_collection is not None else vision_process_groups()
        dtype = transformer_config.params_dtype
        self.conv1 = torch.nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=True, dtype=dtype)
        self.position_embeddings = torch.nn.Embedding(cfg.grid * cfg.grid, cfg.hidden_size, dtype=dtype)
        torch.nn.init.normal_(self.position_embeddings.weight, std=transformer_config.init_method_std)
        self.decoder = TransformerBlock(config=transformer_config,
                                        spec=layer_spec if layer_spec is not None else vit_layer_spec(use_te),
                                        pre_process=True, post_process=False, pg_collection=self.pg_collection)
        self.ln_post = None
        if cfg.post_layernorm:
            self.ln_post = build_module(norm_impl(use_te), config=transformer_config, hidden_size=cfg.hidden_size,
                                        eps=cfg.layernorm_epsilon)
        self.head = SiglipHeadState(cfg, dtype) if cfg.head else None
        # Kept but never run (see VisionConfig.select_layer): frozen as buffers.
        for layer in self.decoder.layers[cfg.layers_run:]:
            freeze_as_buffers(layer)
        if self.ln_post is not None and not cfg.runs_post_layernorm:
            freeze_as_buffers(self.ln_post)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        # The encoder is never split over pipeline stages; kept for megatron's model interface.
        self.decoder.set_input_tensor(input_tensor)

    def position_embedding_for(self, rows: int, cols: int) -> torch.Tensor:
        """[rows*cols, hidden] position embeddings, resized bicubically from the native grid when needed."""
        g = self.cfg.grid
        w = self.position_embeddings.weight
        if (rows, cols) == (g, g):
            return w
        grid = w.view(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False).to(w.dtype)
        return grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode frames of one resolution.

        Args:
            images: [n, 3, H, W], at least one patch per side.

        Returns:
            [n, (H/p)*(W/p), hidden] patch features, row-major over the patch grid.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise VisionConfigError(f"expected frames [n, 3, H, W], got {tuple(images.shape)}")
        rows, cols = patch_grid(images.shape[2], images.shape[3], self.cfg.patch_size)
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, hidden, rows, cols]
        x = x.flatten(2).transpose(1, 2)  # [n, rows*cols, hidden]
        x = x + self.position_embedding_for(rows, cols).unsqueeze(0)
        x = x.transpose(0, 1).contiguous()  # megatron layout [s, b, h]
        n = self.cfg.layers_run
        if n == len(self.decoder.layers):
            x = self.decoder(x, attention_mask=None)
        else:
            # The first n layers only: transformers' hidden_states[select_layer] (the block has no final norm).
            for layer in self.decoder.layers[:n]:
                x, _ = layer(hidden_states=x, attention_mask=None)
        x = x.transpose(0, 1).contiguous()
        if self.ln_post is not None and self.cfg.runs_post_layernorm:
            x = self.ln_post(x)
        return x


def encode_frames(model: SiglipVisionModel, frames: Sequence[torch.Tensor]
                  ) -> List[torch.Tensor]:
    """Encode a list of single frames [3, H, W] of possibly different sizes, batching equal sizes.

    Returns one [(H/p)*(W/p), hidden] tensor per frame, in the input order.
    """
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, f in enumerate(frames):
        if f.dim() != 3 or f.shape[0] != 3:
            raise VisionConfigError(f"frame {i}: expected [3, H, W], got {tuple(f.shape)}")
        groups.setdefault((int(f.shape[1]), int(f.shape[2])), []).append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(frames)
    for _, idx in groups.items():
        feats = model(torch.stack([frames[i] for i in idx]))
        for k, i in enumerate(idx):
            out[i] = feats[k]
    return out  # type: ignore[return-value]

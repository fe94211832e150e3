"""Registry of LongVILA's parts by name: vision encoders, projectors and LLM shapes, and the model builder.

Adding an encoder, projector or LLM shape is one entry in ENCODERS, PROJECTORS or LLMS.
`build_longvila(...)` builds the whole model for this rank's TP/PP position from names (or an LLMShape).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from ..errors import RegistryError
from .longvila import GPTAdapter, LongVILAModel
from .offload import ActivationMemoryConfig, apply_activation_memory
from .te_classes import transformer_config
from .projector import ProjectorConfig, mlp_downsample_spec, projector_transformer_config
from .vision import SiglipVisionModel, VisionConfig, vision_process_groups, vision_transformer_config, vit_layer_spec


ENCODERS: Dict[str, VisionConfig] = {
    # SigLIP so400m/14 (LongVILA's encoder): 27 layers, width 1152, 16 heads, MLP 4304.
    "siglip_so400m_patch14_384": VisionConfig(image_size=384, patch_size=14, hidden_size=1152, num_layers=27,
                                              num_attention_heads=16, ffn_hidden_size=4304),
    "siglip_so400m_patch14_448": VisionConfig(image_size=448, patch_size=14, hidden_size=1152, num_layers=27,
                                              num_attention_heads=16, ffn_hidden_size=4304),
    # For tests and demos: 28 px frames (2x2 patches -> 1 token), 56 px (4x4 -> 4 tokens), 42 px (3x3 -> 4).
    # VILA's encoder semantics: the projector reads the last layer's raw hidden state (VILA's mm_vision_select_layer
    # -1), the post-LayerNorm is kept in the state but not run, so a checkpoint exports to VILA's layout as it runs.
    "siglip_tiny": VisionConfig(image_size=56, patch_size=14, hidden_size=32, num_layers=2,
                                num_attention_heads=4, ffn_hidden_size=64, apply_post_layernorm=False),
}


@dataclass(kw_only=True, frozen=True)
class LLMShape:
    """The shape of a decoder-only LLM (Megatron's GPTModel with RoPE, SwiGLU, RMSNorm, GQA)."""

    hidden_size: int
    """Model width."""
    num_layers: int
    """Transformer layers."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int
    """SwiGLU inner width."""
    vocab_size: int
    """Vocabulary size (before padding for TP)."""
    rotary_base: int
    """RoPE theta."""
    norm_epsilon: float
    """RMSNorm epsilon."""
    qkv_bias: bool
    """Bias on the QKV projection (Qwen2: yes, Llama-3: no)."""
    tie_embeddings: bool = False
    """Share input embeddings and output layer."""
    max_position_embeddings: int = 32768
    """Longest document the rotary table covers (raise it for long-context stages)."""


LLMS: Dict[str, LLMShape] = {
    "qwen2_7b": LLMShape(hidden_size=3584, num_layers=28, num_attention_heads=28, num_query_groups=4,
                         ffn_hidden_size=18944, vocab_size=152064, rotary_base=1000000, norm_epsilon=1e-6,
                         qkv_bias=True, max_position_embeddings=32768),
    # Qwen2-1.5B's published config: 12 query heads over 2 KV groups, embeddings shared with the output layer.
    "qwen2_1_5b": LLMShape(hidden_size=1536, num_layers=28, num_attention_heads=12, num_query_groups=2,
                           ffn_hidden_size=8960, vocab_size=151936, rotary_base=1000000, norm_epsilon=1e-6,
                           qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    "llama3_8b": LLMShape(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
                          ffn_hidden_size=14336, vocab_size=128256, rotary_base=500000, norm_epsilon=1e-5,
                          qkv_bias=False, max_position_embeddings=8192),
    # Qwen2-like at toy size, for tests.
    "tiny": LLMShape(hidden_size=48, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=96, rotary_base=10000, norm_epsilon=1e-6, qkv_bias=True,
                     max_position_embeddings=512),
}


def llm_transformer_config(shape: LLMShape, *, tensor_model_parallel_size: int = 1,
                           pipeline_model_parallel_size: int = 1, context_parallel_size: int = 1,
                           hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
                           params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                           **overrides) -> TransformerConfig:
    """The LLM's TransformerConfig (fusions off so it runs on CPU; override them for GPU runs)."""
    kwargs = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=use_cpu_initialization, tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, context_parallel_size=context_parallel_size,
        hierarchical_context_parallel_sizes=(list(hierarchical_context_parallel_sizes)
                                             if hierarchical_context_parallel_sizes else None),
        cp_comm_type="a2a+p2p" if hierarchical_context_parallel_sizes else None,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    return transformer_config(**kwargs)


def build_mlp_downsample(vision: VisionConfig, llm_hidden: int, *, tensor_model_parallel_size: int = 1,
                         params_dtype: torch.dtype = torch.float32, use_te: bool = False, tp_group=None,
                         transformer_config: Optional[TransformerConfig] = None):
    cfg = ProjectorConfig(vision_hidden_size=vision.hidden_size, llm_hidden_size=llm_hidden)
    tc = transformer_config or projector_transformer_config(
        cfg, tensor_model_parallel_size=tensor_model_parallel_size, params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available())
    return build_module(mlp_downsample_spec(use_te), config=tc, cfg=cfg, tp_group=tp_group)


PROJECTORS: Dict[str, Callable] = {"mlp_downsample": build_mlp_downsample}


def lookup(table: dict, name: str, what: str):
    if name not in table:
        raise RegistryError(f"unknown {what} {name!r}: choose one of {sorted(table)}")
    return table[name]


def _vision_config(encoder: Union[str, VisionConfig]) -> VisionConfig:
    if isinstance(encoder, VisionConfig):
        return encoder
    if isinstance(encoder, str):
        return lookup(ENCODERS, encoder, "vision encoder")
    raise TypeError(f"vision encoder: give a name in ENCODERS or a VisionConfig, got {type(encoder).__name__}")


def build_vision_encoder(name: Union[str, VisionConfig], *, tensor_model_parallel_size: int = 1,
                         params_dtype=torch.float32, use_te: bool = False, pg_collection=None,
                         transformer_overrides: Optional[dict] = None,
                         transformer_config: Optional[TransformerConfig] = None,
                         **config_overrides) -> SiglipVisionModel:
    """Build an encoder by registry name or VisionConfig (config_overrides change fields, e.g. num_layers=26;
    transformer_overrides change its TransformerConfig, e.g. the recompute settings; transformer_config replaces it
    whole, as build_longvila passes it)."""
    cfg = replace(_vision_config(name), **config_overrides)
    tc = transformer_config or vision_transformer_config(
        cfg, tensor_model_parallel_size=tensor_model_parallel_size, params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(), **(transformer_overrides or {}))
    return SiglipVisionModel(cfg, tc, vit_layer_spec(use_te),
                             pg_collection if pg_collection is not None else vision_process_groups(), use_te=use_te)


@dataclass(frozen=True)
class LongVILAConfigs:
    """The three megatron-core configs a LongVILA model is built from (`longvila_configs`)."""

    llm_shape: LLMShape
    """The LLM's shape."""
    vision: VisionConfig
    """The encoder's shape."""
    llm: TransformerConfig
    """The LLM's TransformerConfig."""
    vision_config: TransformerConfig
    """The encoder's layers' TransformerConfig."""
    projector: TransformerConfig
    """The projector's TransformerConfig."""
    activation_memory: ActivationMemoryConfig
    """Recompute and offload settings (already folded into the two transformer configs' recompute fields)."""


def longvila_configs(*, encoder: Union[str, VisionConfig] = "siglip_so400m_patch14_384",
                     llm: Union[str, LLMShape] = "qwen2_7b", tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1, context_parallel_size: int = 1,
                     hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
                     params_dtype: torch.dtype = torch.float32, llm_overrides: Optional[dict] = None,
                     vision_overrides: Optional[dict] = None, projector_overrides: Optional[dict] = None,
                     activation_memory: Optional[ActivationMemoryConfig] = None,
                     use_cpu_initialization: Optional[bool] = None, describe: bool = False) -> LongVILAConfigs:
    """The configs `build_longvila` builds from (one function, so a dry run shows exactly what a launch builds).

    describe: for a dry run on another machine than the target (TE-only checks deferred, see transformer_config).
    use_cpu_initialization: None means on a machine without CUDA.
    """
    if isinstance(llm, LLMShape):
        shape = llm
    elif isinstance(llm, str):
        shape = lookup(LLMS, llm, "LLM shape")
    else:
        raise TypeError(f"build_longvila(llm=...): give a name in LLMS or an LLMShape, got {type(llm).__name__}")
    vis_cfg = _vision_config(encoder)
    memory = activation_memory or ActivationMemoryConfig()
    if memory.llm.granularity == "full" and shape.num_layers % pipeline_model_parallel_size:
        raise ValueError(f"--recompute-granularity full: the LLM's {shape.num_layers} layers do not split evenly "
                         f"over --pipeline-model-parallel-size {pipeline_model_parallel_size}")
    memory.llm.validate(shape.num_layers // pipeline_model_parallel_size, "LLM")
    memory.vision.validate(vis_cfg.layers_run, "vision encoder", linear_bias=True)
    recompute = memory.llm.transformer_config_fields()
    clash = sorted(set(recompute) & set(llm_overrides or {})) if activation_memory is not None else []
    if clash:
        raise ValueError(f"build_longvila: {clash} given both in llm_overrides and activation_memory; give them once")
    cpu_init = (not torch.cuda.is_available()) if use_cpu_initialization is None else use_cpu_initialization
    lm_cfg = llm_transformer_config(shape, tensor_model_parallel_size=tensor_model_parallel_size,
                                    pipeline_model_parallel_size=pipeline_model_parallel_size,
                                    context_parallel_size=context_parallel_size,
                                    hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes,
                                    params_dtype=params_dtype, use_cpu_initialization=cpu_init,
                                    **{**recompute, **(llm_overrides or {}), "describe": describe})
    vis_tc = vision_transformer_config(vis_cfg, tensor_model_parallel_size=tensor_model_parallel_size,
                                       params_dtype=params_dtype, use_cpu_initialization=cpu_init,
                                       **{**memory.vision.transformer_config_fields(), **(vision_overrides or {}),
                                          "describe": describe})
    proj_tc = projector_transformer_config(ProjectorConfig(vision_hidden_size=vis_cfg.hidden_size,
                                                           llm_hidden_size=shape.hidden_size),
                                           tensor_model_parallel_size=tensor_model_parallel_size,
                                           params_dtype=params_dtype, use_cpu_initialization=cpu_init,
                                           **{**(projector_overrides or {}), "describe": describe})
    return LongVILAConfigs(llm_shape=shape, vision=vis_cfg, llm=lm_cfg, vision_config=vis_tc, projector=proj_tc,
                           activation_memory=memory)


def build_longvila(*, encoder: Union[str, VisionConfig] = "siglip_so400m_patch14_384", projector: str = "mlp_downsample",
                   llm: Union[str, LLMShape] = "qwen2_7b", tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   context_parallel_size: int = 1, hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
                   params_dtype: torch.dtype = torch.float32, use_te: bool = False, layer_spec=None,
                   pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                   media_token_id: Optional[int] = None, locality_aware: bool = True,
                   llm_overrides: Optional[dict] = None, real_vocab_size: Optional[int] = None,
                   activation_memory: Optional[ActivationMemoryConfig] = None,
                   vision_overrides: Optional[dict] = None, projector_overrides: Optional[dict] = None
                   ) -> LongVILAModel:
    """Build LongVILA for this rank (megatron parallel_state must be initialized with the same sizes).

    encoder: a name in ENCODERS, or a VisionConfig (e.g. from a checkpoint's model record).
    llm: a name in LLMS, or an LLMShape (e.g. a registered one adjusted for this run with dataclasses.replace:
    padded vocabulary, RoPE base, longest position).
    With pipeline parallelism the encoder and projector exist only on the first stage.
    real_vocab_size: rows of the vocabulary that are tokens, when llm.vocab_size is padded beyond them: the padding
    rows' logits are masked (models.gpt.mask_padded_vocab).
    activation_memory: recompute (Megatron's settings, for the LLM's and the encoder's TransformerConfig) and
    activation offload (models.offload); checked here against the layers each pipeline stage holds.
    llm_overrides, vision_overrides, projector_overrides: fields of the three TransformerConfigs (Megatron's flags
    resolved by training.model_flags for a training run); `longvila_configs` builds them.
    """
    from megatron.core import parallel_state as ps

    from .gpt import build_gpt_model
    from .specs import get_gpt_mmsp_layer_spec

    build_proj = lookup(PROJECTORS, projector, "projector")
    configs = longvila_configs(encoder=encoder, llm=llm, tensor_model_parallel_size=tensor_model_parallel_size,
                               pipeline_model_parallel_size=pipeline_model_parallel_size,
                               context_parallel_size=context_parallel_size,
                               hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes,
                               params_dtype=params_dtype, llm_overrides=llm_overrides,
                               vision_overrides=vision_overrides, projector_overrides=projector_overrides,
                               activation_memory=activation_memory)
    shape, vis_cfg, lm_cfg, memory = configs.llm_shape, configs.vision, configs.llm, configs.activation_memory
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    spec = layer_spec if layer_spec is not None else get_gpt_mmsp_layer_spec("te" if use_te else "local")
    gpt = build_gpt_model(lm_cfg, vocab_size=shape.vocab_size, max_sequence_length=shape.max_position_embeddings,
                          spec=spec, pre_process=pre_process, post_process=post_process,
                          share_embeddings_and_output_weights=shape.tie_embeddings, rotary_base=shape.rotary_base)
    if real_vocab_size is not None and real_vocab_size < shape.vocab_size:
        from .gpt import mask_padded_vocab

        mask_padded_vocab(gpt, real_vocab_size)
    vision = proj = None
    if pre_process:
        vision = build_vision_encoder(vis_cfg, tensor_model_parallel_size=tensor_model_parallel_size,
                                      params_dtype=params_dtype, use_te=use_te,
                                      transformer_config=configs.vision_config)
        proj = build_proj(vis_cfg, shape.hidden_size, tensor_model_parallel_size=tensor_model_parallel_size,
                          params_dtype=params_dtype, use_te=use_te, transformer_config=configs.projector)
    model = LongVILAModel(vision, proj, GPTAdapter(gpt), media_token_id=media_token_id,
                          locality_aware=locality_aware, pre_process=pre_process, post_process=post_process)
    model.activation_memory = memory
    return apply_activation_memory(model, memory)

"""Tensor mappings between Hugging Face's VILA / Qwen2 / Llama / SigLIP keys and this project's checkpoint keys.

The project's keys ("canonical" here) are the keys of `LongVILAModel.sharded_state_dict()` at their global shapes,
as torch_dist stores them: one tensor per parameter with a leading layer axis for transformer layers
(`language_model.model.decoder.layers.mlp.linear_fc1.weight` is [L, 2F, H]), norms under the Transformer Engine
spec's names, padded vocabulary rows. Every format reader produces canonical tensors and every writer consumes
them, so each mapping below exists once, in both directions.

    TensorSpec, canonical_specs(record)            the canonical tensors a record describes (key, global shape)
    extra_state_keys(record)                       Megatron's `_extra_state` objects (local spec) under their keys
    HFTensor, hf_specs(record, prefix)             the Hugging Face tensors (component, name, shape)
    hf_to_canonical(record, key, get, layer)       one canonical tensor (or one layer of it) from HF tensors
    canonical_to_hf(record, key, tensor)           the HF tensors one canonical tensor holds
    merge_qkv / split_qkv                          Megatron's fused QKV: per query group [q heads, k, v]
    parse_llm_config(cfg) / parse_vision_config(cfg)   HF config dicts (4.x and transformers-5 forms) -> shapes
    padded_vocab_size(rows, divisible_by, tp)      Megatron's vocabulary padding
    vila_select(top, where) / vila_frame_separator(top, where, flavour)   what VILA runs, from its config.json
    vila_export_problems(record) / vila_config_mismatches(record, top, proj)   exports VILA would run differently

Mappings (each tested in tests/conversion):
- QKV: per GQA group g, [q heads of g (nq/nkv heads), k_g, v_g], weight and Qwen2's bias alike; SigLIP: groups =
  heads, so [q_h, k_h, v_h] per head.
- SwiGLU fc1 = [gate; up] (the global tensor at any TP: Megatron's torch_dist stores it TP-invariant).
- Norms: LLM input/post-attention RMSNorm -> linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight; SigLIP's
  layer_norm1/2 likewise with biases.
- Embeddings: padded with zero rows to the padded vocabulary; back to the stored rows on export. Tied embeddings
  (tie_word_embeddings: Qwen2-1.5B) have no lm_head in HF and no output_layer here.
- SigLIP: patch_embedding -> conv1, position_embedding -> position_embeddings, q/k/v/out_proj -> linear_qkv /
  linear_proj, fc1/fc2 -> linear_fc1/fc2, post_layernorm -> ln_post, the pooling head verbatim under head.*.
- Projector (VILA mm_projector): layers.1 LayerNorm(4C) -> projector.layernorm, layers.2 -> linear_fc1,
  layers.4 -> linear_fc2.
- RoPE: rope_theta and linear rope_scaling from 4.x keys or transformers 5's rope_parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import ConversionError
from ..models.record import ModelRecord

__all__ = ["ConversionError", "TensorSpec", "HFTensor", "canonical_specs", "extra_state_keys", "hf_specs",
           "hf_to_canonical", "canonical_to_hf", "merge_qkv", "split_qkv", "parse_llm_config",
           "parse_vision_config", "padded_vocab_size", "LLM", "VISION", "PROJ", "COMPONENTS", "rope_from_config",
           "llm_config_v4", "vila_select", "vila_frame_separator", "vila_export_problems", "vila_config_mismatches",
           "VILA_ENCODERS", "VILA_PROJECTOR_EPS"]

LLM = "language_model.model."
"""Canonical prefix of the LLM (LongVILAModel.language_model is a GPTAdapter around Megatron's GPTModel)."""
VISION = "vision_model."
"""Canonical prefix of the vision encoder."""
PROJ = "projector."
"""Canonical prefix of the projector."""
COMPONENTS = ("llm", "vision_tower", "mm_projector")
"""The sub-folders of the Hugging Face VILA layout."""


# ----------------------------------------------------------------------------------------------------
# Fused QKV
# ----------------------------------------------------------------------------------------------------

def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [nq*d, ...], k and v [groups*d, ...] -> Megatron's linear_qkv [(nq + 2*groups)*d, ...]: per query
    group, its nq/groups query heads, then its key head, then its value head (weights and biases alike)."""
    d = k.shape[0] // groups
    rest = tuple(q.shape[1:])
    per = q.shape[0] // groups
    return torch.cat([q.reshape(groups, per, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
                     dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, groups: int, head_dim: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of merge_qkv: linear_qkv [(nq + 2*groups)*d, ...] -> (q, k, v), contiguous."""
    rest = tuple(qkv.shape[1:])
    per = num_heads // groups * head_dim
    x = qkv.reshape(groups, per + 2 * head_dim, *rest)
    q = x[:, :per].reshape(num_heads * head_dim, *rest).contiguous()
    k = x[:, per:per + head_dim].reshape(groups * head_dim, *rest).contiguous()
    v = x[:, per + head_dim:].reshape(groups * head_dim, *rest).contiguous()
    return q, k, v


def padded_vocab_size(rows: int, divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Megatron's padding: rows rounded up to a multiple of make-vocab-size-divisible-by x TP."""
    unit = int(divisible_by) * int(tensor_model_parallel_size)
    return -(-int(rows) // unit) * unit


# ----------------------------------------------------------------------------------------------------
# Hugging Face configs -> shapes
# ----------------------------------------------------------------------------------------------------

_LLM_TYPES = ("qwen2", "llama")


def rope_from_config(cfg: dict, where: str) -> Tuple[float, Optional[dict]]:
    """(theta, scaling) from an LLM config: 4.x `rope_theta` / `rope_scaling` or transformers 5's
    `rope_parameters`. Scaling is None or {"type": "linear", "factor": f}; other kinds are refused."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    key = "rope_scaling"
    if isinstance(params, dict):
        if theta is None:
            theta = params.get("rope_theta")
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling, key = params, "rope_parameters"
    theta = 10000.0 if theta is None else float(theta)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "linear":
        raise ConversionError(f"{where}: {key} {scaling}: only linear RoPE scaling maps to Megatron "
                              f"(seq_len_interpolation_factor); {kind!r} scaling is not supported")
    factor = float(scaling["factor"])
    return theta, (None if factor == 1.0 else {"type": "linear", "factor": factor})


def parse_llm_config(cfg: dict, where: str) -> Tuple[str, dict, float, Optional[dict]]:
    """An HF Qwen2 / Llama config dict -> (llm_type, LLMShape fields without vocab padding, theta, scaling).

    Everything LongVILA's Megatron GPT cannot express is refused with the key to look at.
    """
    mtype = cfg.get("model_type")
    if mtype not in _LLM_TYPES:
        raise ConversionError(f"{where}: model_type {mtype!r}: the LLM must be one of {_LLM_TYPES}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim {cfg['head_dim']} differs from hidden_size / num_attention_heads "
                              f"= {hidden // heads}: not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {cfg.get('hidden_act')!r}: LongVILA's LLM is SwiGLU (silu)")
    if cfg.get("mlp_bias"):
        raise ConversionError(f"{where}: mlp_bias true: not supported (Qwen2 and Llama have none)")
    if mtype == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ConversionError(f"{where}: use_sliding_window true: sliding-window attention is not supported")
        qkv_bias = True
    else:
        qkv_bias = bool(cfg.get("attention_bias", False))
        if qkv_bias:
            raise ConversionError(f"{where}: attention_bias true: a Llama with biases has an o_proj bias too, which "
                                  f"this model does not have")
    if heads % groups:
        raise ConversionError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{groups}")
    theta, scaling = rope_from_config(cfg, where)
    eps = cfg.get("rms_norm_eps", 1e-6)
    shape = dict(hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
                 num_query_groups=groups, ffn_hidden_size=int(cfg["intermediate_size"]),
                 vocab_size=int(cfg["vocab_size"]), norm_epsilon=float(eps), qkv_bias=qkv_bias,
                 tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                 max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)))
    return mtype, shape, theta, scaling


def llm_config_v4(cfg: dict) -> dict:
    """An LLM config dict in the 4.x form VILA reads (transformers 5's rope_parameters -> rope_theta /
    rope_scaling); a 4.x config comes back unchanged."""
    if "rope_parameters" not in cfg:
        return dict(cfg)
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    theta, scaling = rope_from_config(cfg, "config")
    out["rope_theta"] = theta
    out["rope_scaling"] = scaling
    return out


_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def parse_vision_config(cfg: dict, where: str) -> dict:
    """An HF SigLIP vision config dict -> VisionConfig fields (select_layer and head set by the caller)."""
    mtype = cfg.get("model_type")
    if mtype == "siglip" and isinstance(cfg.get("vision_config"), dict):
        cfg = cfg["vision_config"]
        mtype = cfg.get("model_type", "siglip_vision_model")
    if mtype != "siglip_vision_model":
        hint = " (InternViT towers are not supported)" if "intern" in str(mtype).lower() else ""
        raise ConversionError(f"{where}: model_type {mtype!r}: the vision tower must be SigLIP "
                              f"(siglip_vision_model){hint}")
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACT:
        raise ConversionError(f"{where}: hidden_act {act!r}: not supported (gelu_pytorch_tanh or gelu)")
    if int(cfg.get("num_channels", 3)) != 3:
        raise ConversionError(f"{where}: num_channels {cfg.get('num_channels')}: RGB (3) only")
    return dict(image_size=int(cfg.get("image_size", 224)), patch_size=int(cfg.get("patch_size", 16)),
                hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]), ffn_hidden_size=int(cfg["intermediate_size"]),
                layernorm_epsilon=float(cfg.get("layer_norm_eps", 1e-6)), post_layernorm=True,
                activation=_ACT[act])


# ----------------------------------------------------------------------------------------------------
# What VILA runs (read from VILA's code) and what an export must say for VILA to run the same model
# ----------------------------------------------------------------------------------------------------

VILA_PROJECTOR_EPS = 1e-5
"""VILA's projector LayerNorm(4C) is torch's default LayerNorm: its epsilon is not in any config."""
VILA_ENCODERS = {"image_encoder": "llava.model.encoders.BasicImageEncoder",
                 "video_encoder": "llava.model.encoders.BasicVideoEncoder"}
"""The media encoders this model runs (each frame's projector tokens, then `end_tokens`), by config key."""
_VILA_ENCODER_KEYS = ("_target_", "start_tokens", "end_tokens")


def vila_select(top: dict, where: str) -> int:
    """`mm_vision_select_layer` of a VILA config.json, refusing what VILA's loader cannot run or this model differs on.

    VILA builds its vision tower from the top-level config (LlavaConfig / VILAConfig), which sets both keys to None
    when config.json lacks them, so the `getattr(config, ..., default)` defaults of its VisionTower never apply: a
    missing select feature stops VILA ("Unexpected select feature: None"), a missing select layer fails on
    hidden_states[None]. Neither is guessed here."""
    feature = top.get("mm_vision_select_feature")
    if feature is None:
        raise ConversionError(f"{where}: no mm_vision_select_feature: VILA's loader reads it as None and its vision "
                              f"tower refuses to run ('Unexpected select feature: None'); add "
                              f"\"mm_vision_select_feature\": \"cls_patch\" (every SigLIP patch, as VILA's releases "
                              f"say) if that is what the checkpoint was trained with")
    if feature != "cls_patch":
        raise ConversionError(f"{where}: mm_vision_select_feature {feature!r}: SigLIP has no class token, VILA's "
                              f"'patch' would drop a real patch; only 'cls_patch' (every patch) is supported")
    layer = top.get("mm_vision_select_layer")
    if layer is None or isinstance(layer, bool) or not isinstance(layer, int):
        raise ConversionError(f"{where}: mm_vision_select_layer {layer!r}: VILA indexes the vision tower's "
                              f"hidden_states with it, so it must be an integer (VILA's releases: -2)")
    return int(layer)


def _encoder_spec(top: dict, key: str, where: str) -> dict:
    raw = top.get(key)
    if raw is None:
        return {"_target_": VILA_ENCODERS[key]}  # VILA's LlavaConfig default
    spec = raw
    if isinstance(raw, str):
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{where}: {key} {raw!r} is not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ConversionError(f"{where}: {key} {raw!r}: expected VILA's JSON object with a _target_")
    if spec.get("_target_") != VILA_ENCODERS[key]:
        extra = " (temporal pooling of frames)" if "TSP" in str(spec.get("_target_")) else ""
        raise ConversionError(f"{where}: {key} _target_ {spec.get('_target_')!r}{extra} is not supported: this "
                              f"model runs VILA's {VILA_ENCODERS[key]} (every frame's tokens as the projector gives "
                              f"them)")
    unknown = sorted(set(spec) - set(_VILA_ENCODER_KEYS))
    if unknown:
        raise ConversionError(f"{where}: {key} {unknown}: settings of VILA's media encoder this model does not run")
    if spec.get("start_tokens") is not None:
        raise ConversionError(f"{where}: {key} start_tokens {spec['start_tokens']!r}: text before each frame is not "
                              f"supported (the frame separator follows each frame)")
    return spec


def vila_frame_separator(top: dict, where: str, flavour: str):
    """The text VILA puts after each frame's tokens (`end_tokens` of its media encoders, "\\n" by default), or False.

    VILA's remote code (flavour "remote") builds BasicImageEncoder / BasicVideoEncoder with their defaults whatever
    the config says, so its separator is always "\\n"; the dev code instantiates the configured encoders."""
    specs = {k: _encoder_spec(top, k, where) for k in VILA_ENCODERS}
    if flavour == "remote":
        return "\n"
    seps = {k: s.get("end_tokens", "\n") for k, s in specs.items()}
    if seps["image_encoder"] != seps["video_encoder"]:
        raise ConversionError(f"{where}: image_encoder end_tokens {seps['image_encoder']!r} and video_encoder "
                              f"end_tokens {seps['video_encoder']!r} differ: this model puts one separator after "
                              f"every frame, images and videos alike")
    sep = seps["video_encoder"]
    return False if sep is None or sep == "" else sep


def encoder_configs(separator) -> Dict[str, str]:
    """VILA's image_encoder / video_encoder config entries that put `separator` (text, or False) after each frame."""
    out = {}
    for key, target in VILA_ENCODERS.items():
        spec = {"_target_": target}
        if separator != "\n":
            spec["end_tokens"] = separator if separator else None
        out[key] = json.dumps(spec)
    return out


def vila_export_problems(record: ModelRecord) -> List[str]:
    """Why VILA would run the model `record` describes differently from this project (no VILA config says it)."""
    out = []
    v = record.vision_config()
    if record.vision_type != "siglip":
        out.append(f"vision_type {record.vision_type!r}: VILA's layout holds a SigLIP tower here")
    if record.projector_type != "mlp_downsample":
        out.append(f"projector_type {record.projector_type!r}: VILA's projector is the 2x2 mlp_downsample")
    if v.runs_post_layernorm:
        out.append("the vision encoder runs SigLIP's post-LayerNorm after its last layer (select_layer -1 with "
                   "apply_post_layernorm): VILA feeds the projector a raw hidden state (hidden_states"
                   "[mm_vision_select_layer]) and never runs the post-LayerNorm, and no VILA config says otherwise; "
                   "train with an encoder that has apply_post_layernorm=False (VILA's semantics), or keep this "
                   "checkpoint in the project's formats (mcore, nemo)")
    eps = float(record.projector.get("layernorm_epsilon", VILA_PROJECTOR_EPS))
    if eps != VILA_PROJECTOR_EPS:
        out.append(f"projector layernorm_epsilon {eps:g}: VILA's projector LayerNorm uses {VILA_PROJECTOR_EPS:g} "
                   f"(torch's default, not configurable)")
    bias = bool(record.llm.get("qkv_bias"))
    if record.llm_type == "qwen2" and not bias:
        out.append("a qwen2 LLM without QKV biases: transformers' Qwen2 always has them (VILA would create them "
                   "freshly initialised)")
    if record.llm_type == "llama" and bias:
        out.append("a llama LLM with QKV biases: transformers' Llama has them only with attention_bias, which also "
                   "adds an o_proj bias this model does not have")
    sep = (record.media or {}).get("frame_separator", False)
    if sep is True:
        out.append("the frame separator is the project's <frame_sep> token, which VILA's tokenizer does not have "
                   "(VILA's media encoders put text after each frame: train with a text separator, e.g. \"\\n\", or "
                   "none)")
    return out


def vila_config_mismatches(record: ModelRecord, top: dict, proj_cfg: dict, where: str) -> List[str]:
    """What VILA would read differently from `record` in the config.json / mm_projector config an export writes
    (configs carried from the source verbatim included)."""
    out = []
    flavour = "remote" if top.get("model_type") == "vila" else "dev"
    try:
        layer = vila_select(top, where)
        if layer != int(record.vision_select_layer):
            out.append(f"mm_vision_select_layer {layer}, the model feeds the projector hidden state "
                       f"{record.vision_select_layer}")
        sep = vila_frame_separator(top, where, flavour)
    except ConversionError as e:
        return out + [str(e)]
    want = (record.media or {}).get("frame_separator", False) or False
    if want is not True and sep != want:
        out.append(f"VILA would put {sep!r} after each frame ({flavour} flavour config), the model was trained with "
                   f"{want!r}")
    ptype = proj_cfg.get("mm_projector_type")
    if ptype == "mlp_downsample_2x2_fix" and record.token_order != "row_major":
        out.append(f"mm_projector_type {ptype} runs row-major tokens, the model's are {record.token_order}")
    return out


_VOCAB_NOTE = ("VILA's layout stores only the rows of real tokens")


def trimmed_rows_check(record: ModelRecord, key: str, tensor: torch.Tensor) -> None:
    """Refuse to drop vocabulary rows (`key`: the embedding or output layer) that are more than padding.

    An export keeps record.llm["vocab_size"] rows. The rows after them are padding when no token of the model's
    tokenizer has their id (Megatron's divisibility padding: masked out of the softmax, never an input), or when
    they are all zero (what a conversion from VILA pads with: VILA's loader adds its own tokens' rows itself, freshly
    initialised). Any other dropped row was learned, and dropping it changes the model."""
    keep = int(record.llm["vocab_size"])
    used = int((record.tokenizer or {}).get("vocab_size") or 0)
    if used <= keep or tensor.shape[0] <= keep:
        return
    rows = tensor[keep:min(used, tensor.shape[0])]
    learned = (rows != 0).flatten(1).any(dim=1).nonzero().flatten()
    if learned.numel():
        ids = [keep + int(i) for i in learned[:8]]
        names = {int(v): k for k, v in (record.tokenizer or {}).items()
                 if k.endswith("_token_id") and isinstance(v, int)}
        what = ", ".join(f"{i}" + (f" ({names[i]})" if i in names else "") for i in ids)
        raise ConversionError(f"{key}: rows {what} hold values, but the export keeps only the first {keep} rows "
                              f"(llm vocab_size) and these ids are tokens of the model's tokenizer "
                              f"({used} tokens): dropping them would change what those tokens mean ({_VOCAB_NOTE}). "
                              f"Keep this checkpoint in the project's formats (mcore, nemo)")


# ----------------------------------------------------------------------------------------------------
# Canonical tensors
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One canonical tensor."""

    key: str
    """Its key (as in the project's torch_dist checkpoints)."""
    shape: Tuple[int, ...]
    """Global shape (a leading layer axis when `stacked`)."""
    stacked: bool
    """Transformer-layer parameter with a leading layer axis."""


def _vit(record: ModelRecord):
    return record.vision_config()


def _llm_dims(record: ModelRecord):
    llm = record.llm
    h, nq, g = int(llm["hidden_size"]), int(llm["num_attention_heads"]), int(llm["num_query_groups"])
    return h, nq, g, h // nq, int(llm["ffn_hidden_size"]), int(llm["num_layers"])


def canonical_specs(record: ModelRecord) -> List[TensorSpec]:
    """Every canonical tensor of the model `record` describes, in a fixed order (vision, projector, LLM)."""
    v = _vit(record)
    c, f, lv, p = v.hidden_size, v.ffn_hidden_size, v.num_layers, v.patch_size
    out = [TensorSpec(VISION + "conv1.weight", (c, 3, p, p), False), TensorSpec(VISION + "conv1.bias", (c,), False),
           TensorSpec(VISION + "position_embeddings.weight", (v.grid * v.grid, c), False)]
    lay = VISION + "decoder.layers."
    for name, shape in (("self_attention.linear_qkv.layer_norm_weight", (c,)),
                        ("self_attention.linear_qkv.layer_norm_bias", (c,)),
                        ("self_attention.linear_qkv.weight", (3 * c, c)), ("self_attention.linear_qkv.bias", (3 * c,)),
                        ("self_attention.linear_proj.weight", (c, c)), ("self_attention.linear_proj.bias", (c,)),
                        ("mlp.linear_fc1.layer_norm_weight", (c,)), ("mlp.linear_fc1.layer_norm_bias", (c,)),
                        ("mlp.linear_fc1.weight", (f, c)), ("mlp.linear_fc1.bias", (f,)),
                        ("mlp.linear_fc2.weight", (c, f)), ("mlp.linear_fc2.bias", (c,))):
        out.append(TensorSpec(lay + name, (lv, *shape), True))
    if v.post_layernorm:
        out += [TensorSpec(VISION + "ln_post.weight", (c,), False), TensorSpec(VISION + "ln_post.bias", (c,), False)]
    if v.head:
        for name, shape in (("probe", (1, 1, c)), ("attention.in_proj_weight", (3 * c, c)),
                            ("attention.in_proj_bias", (3 * c,)), ("attention.out_proj.weight", (c, c)),
                            ("attention.out_proj.bias", (c,)), ("layernorm.weight", (c,)), ("layernorm.bias", (c,)),
                            ("mlp.fc1.weight", (f, c)), ("mlp.fc1.bias", (f,)), ("mlp.fc2.weight", (c, f)),
                            ("mlp.fc2.bias", (c,))):
            out.append(TensorSpec(VISION + "head." + name, shape, False))
    h, nq, g, d, ffn, L = _llm_dims(record)
    out += [TensorSpec(PROJ + "layernorm.weight", (4 * c,), False), TensorSpec(PROJ + "layernorm.bias", (4 * c,), False),
            TensorSpec(PROJ + "mlp.linear_fc1.weight", (h, 4 * c), False),
            TensorSpec(PROJ + "mlp.linear_fc1.bias", (h,), False),
            TensorSpec(PROJ + "mlp.linear_fc2.weight", (h, h), False),
            TensorSpec(PROJ + "mlp.linear_fc2.bias", (h,), False)]
    vp = int(record.padded_vocab_size)
    out.append(TensorSpec(LLM + "embedding.word_embeddings.weight", (vp, h), False))
    lay = LLM + "decoder.layers."
    qkv = (nq + 2 * g) * d
    layer = [("self_attention.linear_qkv.layer_norm_weight", (h,)), ("self_attention.linear_qkv.weight", (qkv, h))]
    if record.llm.get("qkv_bias"):
        layer.append(("self_attention.linear_qkv.bias", (qkv,)))
    layer += [("self_attention.linear_proj.weight", (h, nq * d)), ("mlp.linear_fc1.layer_norm_weight", (h,)),
              ("mlp.linear_fc1.weight", (2 * ffn, h)), ("mlp.linear_fc2.weight", (h, ffn))]
    out += [TensorSpec(lay + name, (L, *shape), True) for name, shape in layer]
    out.append(TensorSpec(LLM + "decoder.final_layernorm.weight", (h,), False))
    if not record.llm.get("tie_embeddings"):
        out.append(TensorSpec(LLM + "output_layer.weight", (vp, h), False))
    return out


_EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_keys(record: ModelRecord) -> List[str]:
    """The unique keys of the `_extra_state` objects the local spec's linear layers save (each holds None):
    per layer `<prefix>decoder.layers.<module>._extra_state/shard_<l>_<L>`, and the projector's two linears."""
    v = _vit(record)
    out = []
    for prefix, n in ((VISION, v.num_layers), (LLM, int(record.llm["num_layers"]))):
        for layer in range(n):
            out += [f"{prefix}decoder.layers.{m}._extra_state/shard_{layer}_{n}" for m in _EXTRA_STATE_MODULES]
    out += [f"{PROJ}mlp.linear_fc1._extra_state/shard_0_1", f"{PROJ}mlp.linear_fc2._extra_state/shard_0_1"]
    return out


# ----------------------------------------------------------------------------------------------------
# Hugging Face tensors
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFTensor:
    """One tensor of the Hugging Face VILA layout."""

    component: str
    """"llm", "vision_tower" or "mm_projector" (the sub-folder)."""
    name: str
    """Its key inside the component's safetensors files."""
    shape: Tuple[int, ...]
    """Its shape."""


def _vit_layer_hf(c: int, f: int) -> List[Tuple[str, Tuple[int, ...]]]:
    return [("layer_norm1.weight", (c,)), ("layer_norm1.bias", (c,)),
            ("self_attn.q_proj.weight", (c, c)), ("self_attn.q_proj.bias", (c,)),
            ("self_attn.k_proj.weight", (c, c)), ("self_attn.k_proj.bias", (c,)),
            ("self_attn.v_proj.weight", (c, c)), ("self_attn.v_proj.bias", (c,)),
            ("self_attn.out_proj.weight", (c, c)), ("self_attn.out_proj.bias", (c,)),
            ("layer_norm2.weight", (c,)), ("layer_norm2.bias", (c,)),
            ("mlp.fc1.weight", (f, c)), ("mlp.fc1.bias", (f,)), ("mlp.fc2.weight", (c, f)), ("mlp.fc2.bias", (c,))]


def hf_specs(record: ModelRecord, vision_prefix: str = "vision_model.") -> List[HFTensor]:
    """Every HF tensor of the model `record` describes (the LLM's embedding at its stored rows)."""
    v = _vit(record)
    c, f = v.hidden_size, v.ffn_hidden_size
    vp = vision_prefix
    out = [HFTensor("vision_tower", vp + "embeddings.patch_embedding.weight", (c, 3, v.patch_size, v.patch_size)),
           HFTensor("vision_tower", vp + "embeddings.patch_embedding.bias", (c,)),
           HFTensor("vision_tower", vp + "embeddings.position_embedding.weight", (v.grid * v.grid, c))]
    for layer in range(v.num_layers):
        out += [HFTensor("vision_tower", f"{vp}encoder.layers.{layer}.{n}", s) for n, s in _vit_layer_hf(c, f)]
    if v.post_layernorm:
        out += [HFTensor("vision_tower", vp + "post_layernorm.weight", (c,)),
                HFTensor("vision_tower", vp + "post_layernorm.bias", (c,))]
    if v.head:
        for spec in canonical_specs(record):
            if spec.key.startswith(VISION + "head."):
                out.append(HFTensor("vision_tower", vp + spec.key[len(VISION):], spec.shape))
    h, nq, g, d, ffn, L = _llm_dims(record)
    out += [HFTensor("mm_projector", "layers.1.weight", (4 * c,)), HFTensor("mm_projector", "layers.1.bias", (4 * c,)),
            HFTensor("mm_projector", "layers.2.weight", (h, 4 * c)), HFTensor("mm_projector", "layers.2.bias", (h,)),
            HFTensor("mm_projector", "layers.4.weight", (h, h)), HFTensor("mm_projector", "layers.4.bias", (h,))]
    rows = int(record.llm["vocab_size"])
    out.append(HFTensor("llm", "model.embed_tokens.weight", (rows, h)))
    bias = bool(record.llm.get("qkv_bias"))
    for layer in range(L):
        p = f"model.layers.{layer}."
        out += [HFTensor("llm", p + "input_layernorm.weight", (h,)),
                HFTensor("llm", p + "self_attn.q_proj.weight", (nq * d, h)),
                HFTensor("llm", p + "self_attn.k_proj.weight", (g * d, h)),
                HFTensor("llm", p + "self_attn.v_proj.weight", (g * d, h))]
        if bias:
            out += [HFTensor("llm", p + "self_attn.q_proj.bias", (nq * d,)),
                    HFTensor("llm", p + "self_attn.k_proj.bias", (g * d,)),
                    HFTensor("llm", p + "self_attn.v_proj.bias", (g * d,))]
        out += [HFTensor("llm", p + "self_attn.o_proj.weight", (h, nq * d)),
                HFTensor("llm", p + "post_attention_layernorm.weight", (h,)),
                HFTensor("llm", p + "mlp.gate_proj.weight", (ffn, h)), HFTensor("llm", p + "mlp.up_proj.weight", (ffn, h)),
                HFTensor("llm", p + "mlp.down_proj.weight", (h, ffn))]
    out.append(HFTensor("llm", "model.norm.weight", (h,)))
    if not record.llm.get("tie_embeddings"):
        out.append(HFTensor("llm", "lm_head.weight", (rows, h)))
    return out


# Per-layer rules: canonical suffix -> (component, HF names with {p} for the layer prefix, kind)
_VIT_RULES = {
    "self_attention.linear_qkv.layer_norm_weight": (["layer_norm1.weight"], "same"),
    "self_attention.linear_qkv.layer_norm_bias": (["layer_norm1.bias"], "same"),
    "self_attention.linear_qkv.weight": (["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"], "qkv"),
    "self_attention.linear_qkv.bias": (["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
                                       "qkv"),
    "self_attention.linear_proj.weight": (["self_attn.out_proj.weight"], "same"),
    "self_attention.linear_proj.bias": (["self_attn.out_proj.bias"], "same"),
    "mlp.linear_fc1.layer_norm_weight": (["layer_norm2.weight"], "same"),
    "mlp.linear_fc1.layer_norm_bias": (["layer_norm2.bias"], "same"),
    "mlp.linear_fc1.weight": (["mlp.fc1.weight"], "same"), "mlp.linear_fc1.bias": (["mlp.fc1.bias"], "same"),
    "mlp.linear_fc2.weight": (["mlp.fc2.weight"], "same"), "mlp.linear_fc2.bias": (["mlp.fc2.bias"], "same"),
}
_LLM_RULES = {
    "self_attention.linear_qkv.layer_norm_weight": (["input_layernorm.weight"], "same"),
    "self_attention.linear_qkv.weight": (["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"], "qkv"),
    "self_attention.linear_qkv.bias": (["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
                                       "qkv"),
    "self_attention.linear_proj.weight": (["self_attn.o_proj.weight"], "same"),
    "mlp.linear_fc1.layer_norm_weight": (["post_attention_layernorm.weight"], "same"),
    "mlp.linear_fc1.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], "glu"),
    "mlp.linear_fc2.weight": (["mlp.down_proj.weight"], "same"),
}
_PROJ_RULES = {"layernorm.weight": "layers.1.weight", "layernorm.bias": "layers.1.bias",
               "mlp.linear_fc1.weight": "layers.2.weight", "mlp.linear_fc1.bias": "layers.2.bias",
               "mlp.linear_fc2.weight": "layers.4.weight", "mlp.linear_fc2.bias": "layers.4.bias"}
_VIT_SINGLE = {"conv1.weight": "embeddings.patch_embedding.weight", "conv1.bias": "embeddings.patch_embedding.bias",
               "position_embeddings.weight": "embeddings.position_embedding.weight",
               "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_LLM_SINGLE = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
               "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}


@dataclass(frozen=True)
class _Rule:
    component: str
    names: List[str]      # HF names (per-layer names carry the layer prefix at use)
    kind: str             # same | qkv | glu | vocab
    layer_prefix: Optional[str]  # HF prefix of layer l, formatted with {l}; None for non-layer tensors


def _rule(record: ModelRecord, key: str, vision_prefix: str) -> _Rule:
    if key.startswith(VISION + "decoder.layers."):
        suffix = key[len(VISION + "decoder.layers."):]
        if suffix in _VIT_RULES:
            names, kind = _VIT_RULES[suffix]
            return _Rule("vision_tower", names, kind, vision_prefix + "encoder.layers.{l}.")
    elif key.startswith(VISION + "head."):
        return _Rule("vision_tower", [vision_prefix + key[len(VISION):]], "same", None)
    elif key.startswith(VISION):
        suffix = key[len(VISION):]
        if suffix in _VIT_SINGLE:
            return _Rule("vision_tower", [vision_prefix + _VIT_SINGLE[suffix]], "same", None)
    elif key.startswith(PROJ):
        suffix = key[len(PROJ):]
        if suffix in _PROJ_RULES:
            return _Rule("mm_projector", [_PROJ_RULES[suffix]], "same", None)
    elif key.startswith(LLM + "decoder.layers."):
        suffix = key[len(LLM + "decoder.layers."):]
        if suffix in _LLM_RULES:
            names, kind = _LLM_RULES[suffix]
            return _Rule("llm", names, kind, "model.layers.{l}.")
    elif key.startswith(LLM):
        suffix = key[len(LLM):]
        if suffix in _LLM_SINGLE:
            kind = "vocab" if suffix != "decoder.final_layernorm.weight" else "same"
            return _Rule("llm", [_LLM_SINGLE[suffix]], kind, None)
    raise ConversionError(f"no Hugging Face mapping for the canonical key {key!r}")


def _qkv_groups(record: ModelRecord, key: str) -> Tuple[int, int, int]:
    """(heads, groups, head_dim) of the fused QKV under `key`."""
    if key.startswith(VISION):
        v = _vit(record)
        return v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads
    h, nq, g, d, _, _ = _llm_dims(record)
    return nq, g, d


def hf_to_canonical(record: ModelRecord, key: str, get: Callable[[str, str], torch.Tensor],
                    layer: Optional[int] = None, *, vision_prefix: str = "vision_model.",
                    stacked_layers: Optional[int] = None) -> torch.Tensor:
    """The canonical tensor `key` (its layer `layer` for stacked keys, else the whole stack) from HF tensors.

    get(component, name) returns one HF tensor. The embedding and output layer are padded with zero rows to
    record.padded_vocab_size.
    """
    rule = _rule(record, key, vision_prefix)

    def one(prefix: str) -> torch.Tensor:
        parts = [get(rule.component, prefix + n) for n in rule.names]
        if rule.kind == "same":
            return parts[0]
        if rule.kind == "qkv":
            heads, groups, _ = _qkv_groups(record, key)
            return merge_qkv(parts[0], parts[1], parts[2], groups)
        if rule.kind == "glu":
            return torch.cat(parts, dim=0)
        t = parts[0]  # vocab
        pad = int(record.padded_vocab_size) - t.shape[0]
        if pad < 0:
            raise ConversionError(f"{rule.component}/{rule.names[0]} has {t.shape[0]} rows, more than the padded "
                                  f"vocabulary {record.padded_vocab_size}")
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    if rule.layer_prefix is None:
        return one("")
    if layer is not None:
        return one(rule.layer_prefix.format(l=layer))
    n = stacked_layers
    if n is None:
        n = _vit(record).num_layers if key.startswith(VISION) else int(record.llm["num_layers"])
    first = one(rule.layer_prefix.format(l=0))
    out = first.new_empty((n, *first.shape))
    out[0] = first
    for i in range(1, n):
        out[i] = one(rule.layer_prefix.format(l=i))
    return out


def canonical_to_hf(record: ModelRecord, key: str, tensor: torch.Tensor, *, vision_prefix: str = "vision_model."
                    ) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """The HF tensors (component, name, tensor) one whole canonical tensor holds (views where possible)."""
    rule = _rule(record, key, vision_prefix)

    def one(t: torch.Tensor, prefix: str):
        if rule.kind == "same":
            yield rule.component, prefix + rule.names[0], t
        elif rule.kind == "qkv":
            heads, groups, d = _qkv_groups(record, key)
            for n, part in zip(rule.names, split_qkv(t, heads, groups, d)):
                yield rule.component, prefix + n, part
        elif rule.kind == "glu":
            gate, up = t.chunk(2, dim=0)
            yield rule.component, prefix + rule.names[0], gate
            yield rule.component, prefix + rule.names[1], up
        else:  # vocab: the stored rows only (refused where a dropped row is more than padding)
            trimmed_rows_check(record, key, t)
            yield rule.component, prefix + rule.names[0], t[: int(record.llm["vocab_size"])]

    if rule.layer_prefix is None:
        yield from one(tensor, "")
    else:
        for i in range(tensor.shape[0]):
            yield from one(tensor[i], rule.layer_prefix.format(l=i))


def hf_sources_of(record: ModelRecord, key: str, vision_prefix: str = "vision_model.") -> List[Tuple[str, str]]:
    """(component, name) of every HF tensor the canonical `key` is made of (all layers)."""
    rule = _rule(record, key, vision_prefix)
    if rule.layer_prefix is None:
        return [(rule.component, n) for n in rule.names]
    n = _vit(record).num_layers if key.startswith(VISION) else int(record.llm["num_layers"])
    return [(rule.component, rule.layer_prefix.format(l=i) + name) for i in range(n) for name in rule.names]


def record_fields(record: ModelRecord) -> Dict[str, object]:
    """The record as plain fields (for messages and tests)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "assets"}

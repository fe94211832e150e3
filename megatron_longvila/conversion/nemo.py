"""NeMo 2 checkpoints of LongVILA (NeVA names), written and read without NeMo installed.

Layout (NeMo 2's `nemo.lightning.ckpt_utils`: `context/` and `weights/`):
    <root>/weights/            torch_dist (megatron dist-checkpointing), keys as NeMo's MegatronParallel stores them:
                               `module.` + the NeVA model's names: `language_model.*` (Megatron GPT),
                               `vision_model.*` (Megatron ViT, SigLIP), `vision_projection.{1,2,4}.*` (NeMo's
                               `vila_downsample_mlp`: Sequential(DownSampleBlock, LayerNorm(4C), Linear, GELU, Linear)),
                               layers stacked as in any megatron checkpoint
    <root>/context/model.yaml  the model's configuration in NeMo's `_target_` form (NevaModel / NevaConfig, the
                               LLM's GPT config, SigLIPViTConfig, MultimodalProjectorConfig vila_downsample_mlp)
    <root>/context/nemo_tokenizer/   the LLM's tokenizer files (what NeMo's AutoTokenizer artifact copies there)
    <root>/context/longvila/   this project's model record (+ model_assets/): what NeMo's files cannot say (VILA's
                               layer -2 without post-LayerNorm, the token order, VILA's files for the way back)

What NeMo needs beyond this, and why it is not written: `context/io.json`, a Fiddle graph of NeMo's
`TrainerContext` (model, trainer, data module) that `nemo.lightning.io.load_context` rebuilds by importing NeMo's
classes; only NeMo can write a faithful one. Loading these weights in NeMo therefore means building the NevaModel
from `model.yaml`'s values and loading `weights/` with NeMo's MegatronCheckpointIO (or megatron's
`dist_checkpointing.load`). Everything here follows NeMo's code as read (NeMo 2, `vlm/neva`, `vlm/vision`); nothing
was run with NeMo. NeMo's own `vila_downsample_mlp` transposes MCore's [s, b, h] to [b, s, h] before the 2x2 block
and does not transpose back, while NeVA hands it [seq, tiles, h]: as read it is right for one image and doubtful
for several frames; this project does not rely on it (docs/CONVERSION.md).

    is_nemo(path), NeMoSource(path), write_nemo(source, root, ...), to_nemo_key(key), from_nemo_key(key)
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..models.record import ModelRecord, read_model_record, write_model_record
from .mappings import canonical_specs, extra_state_keys, LLM, PROJ, VISION
from ..errors import ConversionError
from .mcore import laid_out, rows_needed
from .source import Source, problems_error
from .storage import DcpReader, write_dcp

__all__ = ["is_nemo", "NeMoSource", "write_nemo", "to_nemo_key", "from_nemo_key", "model_yaml"]

_PROJ_MAP = (("layernorm.", "1."), ("mlp.linear_fc1.", "2."), ("mlp.linear_fc2.", "4."))
RECORD_DIR = os.path.join("context", "longvila")


def to_nemo_key(key: str) -> Optional[str]:
    """Canonical key (or ShardedObject unique key) -> NeMo's; None for what NeMo's model has no slot for (the
    projector linears' `_extra_state`: NeMo's projector is a plain torch Sequential)."""
    if key.startswith(LLM):
        return "module.language_model." + key[len(LLM):]
    if key.startswith(VISION):
        return "module." + key
    if key.startswith(PROJ):
        rest = key[len(PROJ):]
        if "_extra_state" in rest:
            return None
        for ours, theirs in _PROJ_MAP:
            if rest.startswith(ours):
                return "module.vision_projection." + theirs + rest[len(ours):]
    raise ConversionError(f"no NeMo name for {key!r}")


def from_nemo_key(key: str) -> Optional[str]:
    """NeMo's key -> canonical; None for keys outside the model (optimizer state, unknown modules)."""
    if key.startswith("module.language_model."):
        return LLM + key[len("module.language_model."):]
    if key.startswith("module.vision_model."):
        return key[len("module."):]
    if key.startswith("module.vision_projection."):
        rest = key[len("module.vision_projection."):]
        for ours, theirs in _PROJ_MAP:
            if rest.startswith(theirs):
                return PROJ + ours + rest[len(theirs):]
    return None


def is_nemo(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "context")) and os.path.isdir(os.path.join(path, "weights"))


# ----------------------------------------------------------------------------------------------------
# model.yaml
# ----------------------------------------------------------------------------------------------------

def _yaml(d, indent=0) -> str:
    lines = []
    for k, v in d.items():
        pad = "  " * indent
        if isinstance(v, dict):
            lines.append(f"{pad}{k}:")
            lines.append(_yaml(v, indent + 1))
        else:
            lines.append(f"{pad}{k}: {json.dumps(v)}")  # JSON scalars are valid YAML scalars
    return "\n".join(lines)


def model_yaml(record: ModelRecord) -> str:
    """NeMo's model.yaml for the model (NeVA with a Qwen2 / Llama GPT config, SigLIP, vila_downsample_mlp)."""
    llm, v = record.llm, record.vision_config()
    cls = "nemo.collections.llm.gpt.model.qwen2.Qwen2Config" if record.llm_type == "qwen2" else \
        "nemo.collections.llm.gpt.model.llama.LlamaConfig"
    language = {
        "_target_": cls, "num_layers": llm["num_layers"], "hidden_size": llm["hidden_size"],
        "ffn_hidden_size": llm["ffn_hidden_size"], "num_attention_heads": llm["num_attention_heads"],
        "num_query_groups": llm["num_query_groups"], "kv_channels": llm["hidden_size"] // llm["num_attention_heads"],
        "layernorm_epsilon": llm["norm_epsilon"], "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False, "add_qkv_bias": bool(llm["qkv_bias"]), "position_embedding_type": "rope",
        "rotary_base": record.rope_theta,
        "seq_len_interpolation_factor": (record.rope_scaling or {}).get("factor"),
        "seq_length": llm["max_position_embeddings"],
        "share_embeddings_and_output_weights": bool(llm["tie_embeddings"]),
        # NeMo pads vocab_size to a multiple of make_vocab_size_divisible_by x TP, as Megatron does.
        "vocab_size": rows_needed(record),
        "make_vocab_size_divisible_by": int(record.default_layout.get("make_vocab_size_divisible_by", 128)),
        "tensor_model_parallel_size": int(record.default_layout.get("tensor_model_parallel_size", 1)),
        "pipeline_model_parallel_size": int(record.default_layout.get("pipeline_model_parallel_size", 1)),
    }
    vision = {
        "_target_": "nemo.collections.vlm.vision.siglip_vit.SigLIPViTConfig", "vision_model_type": "siglip",
        "num_layers": v.num_layers, "hidden_size": v.hidden_size, "ffn_hidden_size": v.ffn_hidden_size,
        "num_attention_heads": v.num_attention_heads, "kv_channels": v.hidden_size // v.num_attention_heads,
        "patch_dim": v.patch_size, "img_h": v.image_size, "img_w": v.image_size,
        "layernorm_epsilon": v.layernorm_epsilon, "add_class_token": False, "class_token_len": 0,
    }
    projection = {"_target_": "nemo.collections.vlm.vision.base.MultimodalProjectorConfig",
                  "projector_type": "vila_downsample_mlp", "input_size": v.hidden_size,
                  "hidden_size": llm["hidden_size"], "ffn_hidden_size": llm["hidden_size"]}
    doc = {"_target_": "nemo.collections.vlm.neva.model.base.NevaModel",
           "config": {"_target_": "nemo.collections.vlm.neva.model.base.NevaConfig",
                      "language_transformer_config": language, "vision_transformer_config": vision,
                      "vision_projection_config": projection,
                      "vision_feature_layer": int(record.vision_select_layer), "drop_vision_class_token": False},
           "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                         "pretrained_model_name": "nemo_tokenizer"}}
    return ("# NeMo 2 model configuration written by megatron_longvila (NeMo not installed: matches NeMo's code as "
            "read).\n# VILA's feature is SigLIP layer -2 WITHOUT post-LayerNorm; NeMo's ViT applies ln_post: see "
            "context/longvila/model_record.json.\n" + _yaml(doc) + "\n")


# ----------------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------------

class NeMoSource(Source):
    """A NeMo 2 LongVILA checkpoint as canonical tensors. The model comes from context/longvila/ (written by this
    project); a NeMo checkpoint without it is refused (its model.yaml cannot say what VILA runs)."""

    format = "nemo"

    def __init__(self, path: str):
        self.path = path
        record = read_model_record(os.path.join(path, RECORD_DIR))
        if record is None:
            raise ConversionError(f"{path}: no {RECORD_DIR}/model_record.json: only NeMo checkpoints this project "
                                  f"wrote carry what VILA runs (SigLIP layer, token order); convert from the HF "
                                  f"VILA checkpoint instead")
        self.record = record
        self.reader = DcpReader(os.path.join(path, "weights"))
        want = {s.key: s.shape for s in canonical_specs(record)}
        have = {}
        unexpected = []
        for k, (shape, _) in self.reader.tensors.items():
            c = from_nemo_key(k)
            if c is None:
                if k.startswith("module."):
                    unexpected.append(f"{k} {list(shape)}")
                continue
            have[c] = (k, shape)
        err = problems_error(
            os.path.join(path, "weights"),
            [f"{to_nemo_key(k)} {list(s)}" for k, s in sorted(want.items()) if k not in have],
            unexpected + [f"{have[k][0]} {list(have[k][1])}" for k in sorted(have) if k not in want],
            [f"{have[k][0]}: {list(have[k][1])}, the record says {list(s)}" for k, s in sorted(want.items())
             if k in have and tuple(have[k][1]) != tuple(s)])
        if err is not None:
            raise err
        self._names = {c: k for c, (k, _) in have.items()}

    def canonical(self, key: str) -> torch.Tensor:
        return self.reader.read(self._names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.tensors[self._names[key]][1]


def write_nemo(source: Source, root: str, *, tensor_model_parallel_size: int = 1,
               pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
               dtype: Optional[torch.dtype] = None, progress=None, hooks=None) -> ModelRecord:
    """Write `source` as a NeMo 2 checkpoint under `root` (module docstring); returns the record written."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    source, record = laid_out(source, tp, pp, make_vocab_size_divisible_by)
    specs = []
    canon_of = {}
    for s in canonical_specs(record):
        name = to_nemo_key(s.key)
        canon_of[name] = s.key
        specs.append((name, s.shape, dtype if dtype is not None else source.dtype(s.key)))
    out_dtype = {k: d for k, _, d in specs}

    def produce(name):
        t = source.canonical(canon_of[name])
        return t.to(out_dtype[name]) if t.dtype != out_dtype[name] else t

    def written(name, nbytes):
        if progress is not None:
            progress.update(nbytes, name)
        if hooks and "after_tensor" in hooks:
            hooks["after_tensor"](name)

    objects = [n for n in (to_nemo_key(k) for k in extra_state_keys(record)) if n is not None]
    weights = os.path.join(root, "weights")
    write_dcp(weights, specs, produce, objects, on_written=written)
    torch.save({"global_step": 0, "epoch": 0}, os.path.join(weights, "common.pt"))
    ctx = os.path.join(root, "context")
    os.makedirs(os.path.join(ctx, "nemo_tokenizer"), exist_ok=True)
    with open(os.path.join(ctx, "model.yaml"), "w") as f:
        f.write(model_yaml(record))
    for name, data in record.assets.items():
        parts = name.split("/")
        if len(parts) == 2 and parts[0] == "llm" and (parts[1].startswith(("tokenizer", "vocab", "merges",
                                                                            "special_tokens", "added_tokens"))):
            with open(os.path.join(ctx, "nemo_tokenizer", parts[1]), "wb") as f:
                f.write(data)
    os.makedirs(os.path.join(root, RECORD_DIR), exist_ok=True)
    write_model_record(os.path.join(root, RECORD_DIR), record)
    return record

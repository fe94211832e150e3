"""Hugging Face VILA checkpoints (LongVILA, VILA1.5, NVILA as NVIDIA released them) read as canonical tensors.

Both flavours are read: the dev one (`model_type` "llava_llama", `architectures` ["LlavaLlamaModel"], also for Qwen2
LLMs) and the remote-code one (`model_type` "vila", `VILAForCausalLM`, VILA's Python files beside the weights).
Both keep `llm/` (Qwen2 or Llama causal LM, tokenizer), `vision_tower/` (SigLIP, `vision_model.*` keys) and
`mm_projector/` (`layers.1` LayerNorm(4C), `layers.2` / `layers.4` Linear). The sub-folders' own configs are what
VILA loads (its loader reads `<root>/llm` etc. when the top-level `*_cfg` entries are dicts) and what is read here.

Refused, naming the key (each would run, but wrong): NVILA's multi-scale S2 features (`s2` / `dynamic_s2`), the
3x3 downsample (`mm_projector_type` "mlp_downsample_3x3_fix") and any other projector, InternViT and other
non-SigLIP towers (`vision_tower` `model_type`), `mm_vision_select_feature` other than "cls_patch" (SigLIP has no
class token: "patch" would drop a real patch), media encoders other than VILA's basic ones (`image_encoder` /
`video_encoder`: NVILA's temporal pooling `TSPVideoEncoder`), non-linear RoPE scaling. A config.json without
`mm_vision_select_feature` or `mm_vision_select_layer` is refused too: VILA's loader reads them as None and fails
(mappings.vila_select), so no value is guessed. `config_vila_style.json` (the dev-style config a remote-code release
keeps beside config.json, LongVILA-R1) must agree with config.json on every key the model depends on.

What VILA puts after each frame's tokens is read from its media encoders (`end_tokens`, "\n" by default; VILA's
remote code always "\n"); facts VILA's files cannot say (a byte tokenizer's ids, the frame sampling) come back from
the `longvila_facts.json` an export of this project wrote (models.record.HF_FACTS_FILE).

Token order (models.projector): `mlp_downsample_2x2_fix` is row-major. Plain `mlp_downsample` is what VILA's
code ran at training time: row-major since VILA's Dec 2024 code (the Qwen2 LongVILA and NVILA releases are run so
by VILA, TensorRT-LLM and SGLang today), column-major before. The Llama-based releases (VILA1.5,
Llama-3-LongVILA, Aug 2024) are taken as column-major: a guess, recorded in the record's notes and announced;
`token_order=` overrides it.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch

from ..models.record import HF_FACTS_FILE, ModelRecord, merge_hf_facts, record_of
from ..models.registry import LLMShape
from ..models.vision import VisionConfig
from .hf_common import FolderWeights, collect_assets, media_facts, read_json, tokenizer_facts
from .mappings import (COMPONENTS, hf_sources_of, hf_specs, hf_to_canonical, padded_vocab_size, parse_llm_config,
                       parse_vision_config, vila_frame_separator, vila_select)
from ..errors import ConversionError
from .source import Source, check_layout, check_shapes

__all__ = ["HFVilaSource", "is_hf_vila", "SUPPORTED_PROJECTORS"]

logger = logging.getLogger("megatron_longvila.conversion")

SUPPORTED_PROJECTORS = ("mlp_downsample", "mlp_downsample_2x2_fix")
"""VILA projector types with this model's math (2x2 space-to-channel, LayerNorm, Linear, GELU, Linear)."""


def is_hf_vila(path: str) -> bool:
    """A folder with a top-level config.json and VILA's three sub-folders."""
    return os.path.isfile(os.path.join(path, "config.json")) and all(
        os.path.isdir(os.path.join(path, c)) for c in COMPONENTS)


def _sub_config(root: str, top: dict, comp: str) -> dict:
    path = os.path.join(root, comp, "config.json")
    if os.path.isfile(path):
        return read_json(path)
    nested = top.get(f"{comp}_cfg")
    if isinstance(nested, dict):
        return nested
    raise ConversionError(f"{root}: no {comp}/config.json and no {comp}_cfg dict in config.json")


def refuse_unsupported(root: str, top: dict, proj_cfg: dict, vis_cfg: dict) -> str:
    """Raise, naming the key, for releases this model cannot run (module docstring); returns the projector type."""
    where = os.path.join(root, "config.json")
    for key in ("s2", "dynamic_s2"):
        if top.get(key):
            raise ConversionError(f"{where}: {key} = {top[key]!r}: NVILA's multi-scale S2 vision features are not "
                                  f"supported (this model runs one scale); only checkpoints with {key} false/absent "
                                  f"convert")
    ptype = proj_cfg.get("mm_projector_type") or (top.get("mm_projector_cfg") or {}).get("mm_projector_type") \
        or top.get("mm_projector")
    if ptype not in SUPPORTED_PROJECTORS:
        extra = " (NVILA-Lite's 3x3 downsample)" if ptype == "mlp_downsample_3x3_fix" else ""
        raise ConversionError(f"{os.path.join(root, 'mm_projector', 'config.json')}: mm_projector_type {ptype!r}"
                              f"{extra} is not supported: this model's projector is the 2x2 downsample "
                              f"({' / '.join(SUPPORTED_PROJECTORS)})")
    vila_select(top, where)
    vila_frame_separator(top, where, "remote" if top.get("model_type") == "vila" else "dev")
    _check_dev_style(root, top)
    parse_vision_config(vis_cfg, os.path.join(root, "vision_tower", "config.json"))
    return ptype


DEV_STYLE = "config_vila_style.json"
"""The dev-style (LlavaLlamaModel) config a remote-code release keeps beside its config.json (LongVILA-R1-7B)."""
_SAME_KEYS = ("mm_vision_select_layer", "mm_vision_select_feature", "s2", "dynamic_s2", "image_encoder",
              "video_encoder", "image_aspect_ratio", "num_video_frames", "fps", "mm_projector_cfg",
              "vision_tower_cfg", "llm_cfg")


def _check_dev_style(root: str, top: dict) -> None:
    """A remote-code release's config_vila_style.json says the same model as its config.json (else VILA's dev code
    and its remote code would run different models from one folder: refused, naming the key)."""
    path = os.path.join(root, DEV_STYLE)
    if not os.path.isfile(path):
        return
    dev = read_json(path)
    if dev.get("model_type") not in (None, "llava_llama"):
        raise ConversionError(f"{path}: model_type {dev.get('model_type')!r}: expected VILA's dev-style "
                              f"'llava_llama'")
    for key in _SAME_KEYS:
        a, b = top.get(key), dev.get(key)
        if key.endswith("_cfg") and isinstance(a, dict) and isinstance(b, dict):
            # Sub-configs: the model's keys (names, versions and dtypes may differ between the two writers).
            free = {"_name_or_path", "transformers_version", "torch_dtype", "architectures"}
            diff = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
            if diff:
                raise ConversionError(f"{path}: {key} differs from config.json's at {diff[:6]}: the two configs "
                                      f"describe different models")
        elif key in dev and key in top and a != b:
            raise ConversionError(f"{path}: {key} {b!r}, config.json says {a!r}: the two configs describe "
                                  f"different models")


def vila_record(root: str, top: dict, llm_cfg: dict, vis_cfg: dict, proj_cfg: dict, *, embed_rows: int,
                head: bool, tp: int, pp: int, divisible_by: int, token_order: Optional[str],
                assets: Dict[str, bytes], headers: Dict[str, str], dtype: torch.dtype, flavour: str) -> ModelRecord:
    """The record of a VILA checkpoint from its configs (see the module docstring for what is refused)."""
    ptype = refuse_unsupported(root, top, proj_cfg, vis_cfg)
    where = os.path.join(root, "config.json")
    select = vila_select(top, where)
    llm_type, shape, theta, scaling = parse_llm_config(llm_cfg, os.path.join(root, "llm", "config.json"))
    if embed_rows != shape["vocab_size"]:
        raise ConversionError(f"{root}/llm: model.embed_tokens.weight has {embed_rows} rows, llm/config.json "
                              f"vocab_size is {shape['vocab_size']}")
    vis = parse_vision_config(vis_cfg, os.path.join(root, "vision_tower", "config.json"))
    use_head = vis_cfg.get("vision_use_head", True)
    if bool(use_head) != head:
        raise ConversionError(f"{root}/vision_tower: vision_use_head is {use_head} but the weights "
                              f"{'have' if head else 'lack'} the pooling head (vision_model.head.*)")
    vision = VisionConfig(**vis, select_layer=select, apply_post_layernorm=False, head=head)
    tok = tokenizer_facts(assets, "llm/", vila_tokens=True)
    prep = os.path.join(root, "vision_tower", "preprocessor_config.json")
    separator = vila_frame_separator(top, where, flavour)
    media = media_facts(top, read_json(prep) if os.path.isfile(prep) else None, frame_separator=separator)
    tok, media, names, notes = merge_hf_facts(assets.get(HF_FACTS_FILE), tok, media,
                                              os.path.join(root, HF_FACTS_FILE))
    if ptype == "mlp_downsample_2x2_fix":
        order = "row_major"
    elif llm_type == "llama":
        order = "column_major"
        notes.append("token order column_major is a guess: mm_projector_type mlp_downsample with a Llama LLM "
                     "(VILA1.5 / Llama-3-LongVILA, trained with VILA's 2024 code, which had no final transpose)")
    else:
        order = "row_major"
        notes.append("token order row_major: mm_projector_type mlp_downsample as VILA's current code (and "
                     "TensorRT-LLM, SGLang) runs it")
    if token_order is not None:
        if token_order != order:
            notes.append(f"token order overridden to {token_order} (the reader's choice was {order})")
        order = token_order
    if not tok:
        notes.append("no tokenizer files found in llm/: media token ids unknown")
    # Room for VILA's placeholder tokens (ids after the stored rows) inside the padded tables.
    rows = max(embed_rows, int(tok.get("vocab_size", embed_rows)))
    padded = padded_vocab_size(rows, divisible_by, tp)
    llm_shape = LLMShape(**{k: v for k, v in shape.items() if k != "vocab_size"}, vocab_size=padded,
                         rotary_base=theta)
    record = record_of(llm_shape, vision, real_vocab_size=embed_rows, tokenizer=tok, llm_type=llm_type,
                       rope_scaling=scaling, token_order=order,
                       registry_names={"llm": names.get("llm"), "vision": names.get("vision")}, media=media,
                       default_layout={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                       "make_vocab_size_divisible_by": divisible_by},
                       source={"format": "hf_vila", "flavour": flavour, "path": os.path.abspath(root),
                               "notes": notes},
                       hf={"flavour": flavour, "vision_key_prefix": "vision_model.", "mm_projector_type": ptype,
                           "dtype": str(dtype).replace("torch.", ""), "safetensors": headers},
                       assets=assets)
    check_layout(record, tp, pp, f"{root}: ")
    return record


class HFVilaSource(Source):
    """A Hugging Face VILA folder as canonical tensors (see the module docstring).

    Args:
        path: the folder (config.json, llm/, vision_tower/, mm_projector/).
        tensor_model_parallel_size, pipeline_model_parallel_size, make_vocab_size_divisible_by: the layout the
            record is made for (vocabulary padding, divisibility checks).
        token_order: override the projector token order (row_major / column_major).
    """

    format = "hf"

    def __init__(self, path: str, *, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 make_vocab_size_divisible_by: int = 128, token_order: Optional[str] = None):
        self.path = path
        top = read_json(os.path.join(path, "config.json"))
        mtype = top.get("model_type")
        if mtype not in ("llava_llama", "vila"):
            raise ConversionError(f"{path}/config.json: model_type {mtype!r}: expected VILA's 'llava_llama' (dev "
                                  f"checkpoints) or 'vila' (remote-code checkpoints)")
        flavour = "dev" if mtype == "llava_llama" else "remote"
        llm_cfg = _sub_config(path, top, "llm")
        vis_cfg = _sub_config(path, top, "vision_tower")
        proj_cfg = _sub_config(path, top, "mm_projector")
        # Configs first (their refusals name keys), then weights.
        refuse_unsupported(path, top, proj_cfg, vis_cfg)
        self.weights = {c: FolderWeights(os.path.join(path, c), f"{path}/{c}") for c in COMPONENTS}
        emb = "model.embed_tokens.weight"
        if emb not in self.weights["llm"].where:
            raise ConversionError(f"{path}/llm: no {emb} among its tensors")
        rows = self.weights["llm"].shape(emb)[0]
        head = "vision_model.head.probe" in self.weights["vision_tower"].where
        dtypes = {self.weights[c].dtype(n) for c in COMPONENTS for n in self.weights[c].where}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        headers = {f"{c}/{f}": text for c in COMPONENTS for f, text in self.weights[c].headers().items()}
        assets = collect_assets(path, "")
        self.record = vila_record(path, top, llm_cfg, vis_cfg, proj_cfg, embed_rows=rows, head=head,
                                  tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size,
                                  divisible_by=make_vocab_size_divisible_by, token_order=token_order,
                                  assets=assets, headers=headers, dtype=dtype, flavour=flavour)
        for note in self.record.source["notes"]:
            logger.warning("%s: %s", path, note)
        self._check()

    def _check(self) -> None:
        want = {(t.component, t.name): t.shape for t in hf_specs(self.record)}
        have = {(c, n): self.weights[c].shape(n) for c in COMPONENTS for n in self.weights[c].where}
        check_shapes(self.path, want, have)

    def _get(self, component: str, name: str) -> torch.Tensor:
        return self.weights[component].read(name)

    def canonical(self, key: str) -> torch.Tensor:
        return hf_to_canonical(self.record, key, self._get)

    def canonical_layer(self, key: str, layer: int) -> torch.Tensor:
        return hf_to_canonical(self.record, key, self._get, layer)

    def dtype(self, key: str) -> torch.dtype:
        comp, name = hf_sources_of(self.record, key)[0]
        return self.weights[comp].dtype(name)

    def close(self) -> None:
        for w in self.weights.values():
            w.close()


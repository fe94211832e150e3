"""A stage-1 start from Hugging Face base models: a Qwen2 / Llama causal-LM folder and a SigLIP folder.

The LLM folder is what `save_pretrained` writes (config.json in the 4.x or transformers-5 form, safetensors, the
tokenizer). The SigLIP folder may be a `SiglipVisionModel` (keys `vision_model.*` as transformers 4 saves them, or
without the prefix as transformers 5 does) or a whole `SiglipModel` (its text tower, logit scale and bias are left
out). The projector, which base models do not have, is initialized from a seed the way a fresh torch
`nn.Sequential(LayerNorm, Linear, GELU, Linear)` is (LayerNorm weight 1, bias 0; Linear weights and biases uniform
in +-1/sqrt(fan_in)), so the same seed gives the same start.

The model is set up as VILA trains it: SigLIP's `hidden_states[-2]` (select_layer -2: all but its last layer, no
post-LayerNorm, no head), row-major tokens (VILA's current code). Media token ids are left to the training run's
tokenizer (a base LLM has none); the padded vocabulary keeps room for the placeholders it appends.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional

import torch

from ..models.record import record_of
from ..models.registry import LLMShape
from ..models.vision import VisionConfig
from .hf_common import FolderWeights, collect_assets, media_facts, read_json, tokenizer_facts
from .mappings import (hf_sources_of, hf_specs, hf_to_canonical, padded_vocab_size, parse_llm_config,
                       parse_vision_config, PROJ)
from ..errors import ConversionError
from .source import Source, check_layout, check_shapes

__all__ = ["HFBaseSource", "init_projector", "PLACEHOLDER_ROOM"]

PLACEHOLDER_ROOM = 4
"""Rows kept free after the tokenizer's vocabulary for media placeholders a training run's tokenizer appends."""
_VISION_KEEP = ("config.json", "preprocessor_config.json")


def init_projector(vision_hidden: int, llm_hidden: int, seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Canonical projector tensors as a fresh torch nn.Sequential(LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H))
    initializes them, drawn from torch.Generator().manual_seed(seed)."""
    g = torch.Generator().manual_seed(int(seed))
    c4 = 4 * vision_hidden

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)

    return {PROJ + "layernorm.weight": torch.ones(c4, dtype=dtype), PROJ + "layernorm.bias": torch.zeros(c4, dtype=dtype),
            PROJ + "mlp.linear_fc1.weight": uniform((llm_hidden, c4), c4),
            PROJ + "mlp.linear_fc1.bias": uniform((llm_hidden,), c4),
            PROJ + "mlp.linear_fc2.weight": uniform((llm_hidden, llm_hidden), llm_hidden),
            PROJ + "mlp.linear_fc2.bias": uniform((llm_hidden,), llm_hidden)}


def _vision_rename(name: str) -> Optional[str]:
    if name.startswith("vision_model."):
        return name
    if name.startswith(("text_model.", "logit_scale", "logit_bias")):
        return None  # a whole SiglipModel: the text tower is not part of LongVILA
    return "vision_model." + name  # transformers 5 saves SiglipVisionModel without the prefix


class HFBaseSource(Source):
    """An LLM folder and a SigLIP folder as canonical tensors, the projector from `seed` (module docstring).

    Args:
        llm: the Qwen2 / Llama folder; vision_tower: the SigLIP folder.
        tensor_model_parallel_size, pipeline_model_parallel_size, make_vocab_size_divisible_by: target layout.
        seed: projector initialization seed.
        select_layer: SigLIP hidden state fed to the projector (VILA: -2).
        token_order: the projector's token order (VILA's current code: row_major).
    """

    format = "hf_base"

    def __init__(self, llm: str, vision_tower: str, *, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128, seed: int = 0,
                 select_layer: int = -2, token_order: str = "row_major"):
        self.path = f"{llm} + {vision_tower}"
        llm_cfg = read_json(os.path.join(llm, "config.json"), f"--llm {llm}: config.json")
        vis_cfg = read_json(os.path.join(vision_tower, "config.json"), f"--vision-tower {vision_tower}: config.json")
        vis = parse_vision_config(vis_cfg, f"--vision-tower {vision_tower}/config.json")
        llm_type, shape, theta, scaling = parse_llm_config(llm_cfg, f"--llm {llm}/config.json")
        self.weights = {"llm": FolderWeights(llm, f"--llm {llm}"),
                        "vision_tower": FolderWeights(vision_tower, f"--vision-tower {vision_tower}",
                                                      rename=_vision_rename)}
        emb = "model.embed_tokens.weight"
        if emb not in self.weights["llm"].where:
            raise ConversionError(f"--llm {llm}: no {emb} among its tensors (a causal-LM folder is expected)")
        rows = self.weights["llm"].shape(emb)[0]
        if rows != shape["vocab_size"]:
            raise ConversionError(f"--llm {llm}: {emb} has {rows} rows, config.json vocab_size is "
                                  f"{shape['vocab_size']}")
        head = "vision_model.head.probe" in self.weights["vision_tower"].where
        vision = VisionConfig(**vis, select_layer=select_layer, apply_post_layernorm=False, head=head)
        assets = collect_assets(llm, "llm/")
        vis_assets = collect_assets(vision_tower, "vision_tower/")
        assets.update({k: v for k, v in vis_assets.items() if k.split("/", 1)[1] in _VISION_KEEP})
        tok = tokenizer_facts(assets, "llm/", vila_tokens=False)
        needed = max(rows, int(tok.get("vocab_size", 0)) + PLACEHOLDER_ROOM)
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        padded = padded_vocab_size(needed, make_vocab_size_divisible_by, tp)
        llm_shape = LLMShape(**{k: v for k, v in shape.items() if k != "vocab_size"}, vocab_size=padded,
                             rotary_base=theta)
        dtype = self.weights["llm"].dtype(emb)
        prep = os.path.join(vision_tower, "preprocessor_config.json")
        media = media_facts({"image_aspect_ratio": "resize"}, read_json(prep) if os.path.isfile(prep) else None)
        regenerate = []
        if vis_cfg.get("model_type") != "siglip_vision_model":
            regenerate.append("vision_tower/config.json")  # a SiglipModel config: VILA's tower is the vision part
        self.record = record_of(
            llm_shape, vision, real_vocab_size=rows, tokenizer=tok, llm_type=llm_type, rope_scaling=scaling,
            token_order=token_order, registry_names={"llm": None, "vision": None}, media=media,
            default_layout={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                            "make_vocab_size_divisible_by": make_vocab_size_divisible_by},
            source={"format": "hf_base", "llm": os.path.abspath(llm), "vision_tower": os.path.abspath(vision_tower),
                    "projector_seed": int(seed), "notes": [f"projector initialized from seed {seed}"]},
            hf={"flavour": "dev", "vision_key_prefix": "vision_model.", "mm_projector_type": None,
                "dtype": str(dtype).replace("torch.", ""), "regenerate": regenerate,
                "safetensors": {f"llm/{f}": t for f, t in self.weights["llm"].headers().items()}},
            assets=assets)
        check_layout(self.record, tp, pp, "")
        self._projector = init_projector(vision.hidden_size, shape["hidden_size"], seed, dtype)
        self._check()

    def _check(self) -> None:
        want = {(t.component, t.name): t.shape for t in hf_specs(self.record) if t.component != "mm_projector"}
        have = {(c, n): self.weights[c].shape(n) for c in self.weights for n in self.weights[c].where}
        check_shapes(self.path, want, have)

    def _get(self, component: str, name: str) -> torch.Tensor:
        return self.weights[component].read(name)

    def canonical(self, key: str) -> torch.Tensor:
        if key.startswith(PROJ):
            return self._projector[key].clone()
        return hf_to_canonical(self.record, key, self._get)

    def canonical_layer(self, key: str, layer: int) -> torch.Tensor:
        return hf_to_canonical(self.record, key, self._get, layer)

    def dtype(self, key: str) -> torch.dtype:
        if key.startswith(PROJ):
            return self._projector[key].dtype
        comp, name = hf_sources_of(self.record, key)[0]
        return self.weights[comp].dtype(name)

    def close(self) -> None:
        for w in self.weights.values():
            w.close()

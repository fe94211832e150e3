"""Which parts of LongVILA train in each of its five training stages.

LongVILA trains in stages (paper, Sec. 3): (1) multi-modal alignment: only the projector learns;
(2) pre-training: projector and LLM; (3) short supervised fine-tuning: everything; (4) context
extension of the LLM on long text: the LLM only, on text-only data; (5) long supervised fine-tuning:
everything. `FreezeConfig` says it per module, `STAGES` names the five presets, and `apply_freezing`
sets `requires_grad` accordingly.

Frozen modules keep their parameters out of the optimizer (megatron-core's DDP and optimizer skip
parameters without `requires_grad`); the stage-2 routing still runs its backward whenever the projector
or the encoder trains, so the gradient reaches every encoding rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Union

import torch

from ..errors import FreezingError


@dataclass(kw_only=True, frozen=True)
class FreezeConfig:
    """Per-module training switches."""

    train_vision: bool = True
    """Update the vision encoder."""
    train_projector: bool = True
    """Update the projector."""
    train_llm: bool = True
    """Update the LLM (embeddings, layers, output layer)."""


STAGES: Dict[str, FreezeConfig] = {
    "align": FreezeConfig(train_vision=False, train_projector=True, train_llm=False),
    "pretrain": FreezeConfig(train_vision=False, train_projector=True, train_llm=True),
    "short_sft": FreezeConfig(train_vision=True, train_projector=True, train_llm=True),
    "context_extension": FreezeConfig(train_vision=False, train_projector=False, train_llm=True),
    "long_sft": FreezeConfig(train_vision=True, train_projector=True, train_llm=True),
}
"""The five LongVILA stages, in training order."""


def freeze_config(stage: Union[str, FreezeConfig]) -> FreezeConfig:
    """A stage name (see STAGES) or a FreezeConfig -> FreezeConfig."""
    if isinstance(stage, FreezeConfig):
        return stage
    if stage not in STAGES:
        raise FreezingError(f"unknown training stage {stage!r}: choose one of {list(STAGES)} or pass a FreezeConfig")
    return STAGES[stage]


def _set(module, flag: bool) -> int:
    n = 0
    if module is None:
        return n
    for p in module.parameters():
        p.requires_grad_(flag)
        n += p.numel()
    return n


def apply_freezing(model: torch.nn.Module, stage: Union[str, FreezeConfig]) -> Dict[str, int]:
    """Set `requires_grad` on a LongVILA model's parts for a stage.

    Args:
        model: a module with `vision_model`, `projector` and `language_model` attributes (any may be None on
            pipeline stages that do not hold it).
        stage: a STAGES name or a FreezeConfig.

    Returns:
        Trainable parameter counts per part on this rank ({"vision": n, "projector": n, "llm": n}), 0 for frozen.
    """
    cfg = freeze_config(stage)
    for part in ("vision_model", "projector", "language_model"):
        if not hasattr(model, part):
            raise FreezingError(f"apply_freezing: the model has no `{part}` attribute (expected a LongVILAModel)")
    return {
        "vision": _set(model.vision_model, cfg.train_vision) * cfg.train_vision,
        "projector": _set(model.projector, cfg.train_projector) * cfg.train_projector,
        "llm": _set(model.language_model, cfg.train_llm) * cfg.train_llm,
    }

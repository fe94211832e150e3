"""What a LongVILA training stage is: the `Recipe` dataclass every stage module fills in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ...errors import ArgumentError


@dataclass(kw_only=True, frozen=True)
class Recipe:
    """One stage of LongVILA training. Command-line flags given explicitly override every field."""

    name: str
    """Registry name (--recipe NAME)."""
    stage: int
    """1..5, the order of the stages; each starts from the previous stage's checkpoint."""
    freeze: str
    """Preset of `models.freezing.STAGES`: which of vision encoder / projector / LLM train."""
    data: str
    """What the stage trains on (manifest content), for humans and docs."""
    template: str
    """Chat template of `data.conversation.TEMPLATES` the stage's manifests are rendered with."""
    seq_length: int
    """--seq-length: tokens per packed micro-batch sequence at full scale."""
    global_batch_size: int
    """--global-batch-size at full scale (packed sequences per optimizer step)."""
    lr: float
    """--lr: peak learning rate."""
    min_lr: float
    """--min-lr: floor of the cosine decay."""
    lr_warmup_fraction: float = 0.03
    """Warm-up as a fraction of --train-iters (--lr-warmup-iters overrides it)."""
    weight_decay: float = 0.0
    """--weight-decay."""
    num_frames: Optional[int] = 8
    """Frames sampled per video (None: images or text only)."""
    media: bool = True
    """The stage's samples carry images or video (False: text only; plans and dry runs then assume no frames)."""
    rotary_base: Optional[int] = None
    """RoPE base of the LLM; None keeps the registered LLM's."""
    previous: Optional[str] = None
    """The stage whose checkpoint this one starts from (--pretrained-checkpoint)."""
    notes: str = ""
    """Why the stage is set up this way."""


CONTEXT_EXTENSION_ROPE_BASES: Dict[int, int] = {
    131_072: 15_300_000,
    262_144: 207_112_184,
    524_288: 1_062_356_830,
    1_048_576: 3_580_165_449,
}
"""LongVILA's RoPE base (theta) per target context length of the LLM context-extension stage."""


def rope_base_for_length(seq_length: int) -> int:
    """LongVILA's RoPE base for a context-extension target length; other lengths are an error (no guessing)."""
    if seq_length not in CONTEXT_EXTENSION_ROPE_BASES:
        raise ValueError(f"--seq-length {seq_length}: the context-extension stage has RoPE bases for "
                         f"{sorted(CONTEXT_EXTENSION_ROPE_BASES)}; pick one of them or set --rotary-base explicitly")
    return CONTEXT_EXTENSION_ROPE_BASES[seq_length]


def recipe_rope(recipe: Recipe, seq_length: int, given: Optional[int]) -> Tuple[bool, Optional[int], Optional[int]]:
    """The RoPE facts a run takes from its recipe, for both trainers: (the recipe changes RoPE, the recipe's base at
    this length, the base the user gave explicitly). A recipe that extends the context changes RoPE to LongVILA's
    base for the target length; other recipes keep their `rotary_base` (None: the checkpoint's or the LLM's own).
    models.record / training.providers rank these against the checkpoint's base."""
    changes = recipe.name == "context_extension"
    base = CONTEXT_EXTENSION_ROPE_BASES.get(seq_length) if changes else recipe.rotary_base
    if changes and given is None and base is None:
        raise ArgumentError(f"--recipe {recipe.name} with --seq-length {seq_length}: LongVILA's RoPE bases exist for "
                            f"{sorted(CONTEXT_EXTENSION_ROPE_BASES)}; pick one or give --rotary-base")
    return changes, base, given

"""Stage 4, context extension: the LLM alone learns long text, with LongVILA's RoPE base for the target length."""

from .base import Recipe, rope_base_for_length

TARGET_LENGTH = 262_144
"""Default target context; the RoPE base follows --seq-length (see base.CONTEXT_EXTENSION_ROPE_BASES)."""

RECIPE = Recipe(
    name="context_extension", stage=4, freeze="context_extension", template="plain",
    data="long text documents (SlimPajama style), packed to the target length, text only",
    seq_length=TARGET_LENGTH, global_batch_size=64, lr=2e-5, min_lr=0.0, num_frames=None, media=False,
    rotary_base=rope_base_for_length(TARGET_LENGTH), previous="short_sft",
    notes="Vision encoder and projector frozen; the RoPE base is raised so the longest documents keep "
          "distinguishable positions. Needs MM-SP (--context-parallel-size) at these lengths.",
)

"""Stage 5, long supervised fine-tuning: everything learns, on long videos, under MM-SP."""

from .base import Recipe, rope_base_for_length

RECIPE = Recipe(
    name="long_sft", stage=5, freeze="long_sft", template="chatml",
    data="long-video instruction data (hundreds to thousands of frames per video, LongVILA-SFT style)",
    seq_length=262_144, global_batch_size=32, lr=2e-5, min_lr=0.0, num_frames=1024,
    rotary_base=rope_base_for_length(262_144), previous="context_extension",
    notes="Keeps stage 4's RoPE base; frames are spread over the CP ranks (stage-1 sharding) and their tokens "
          "routed to the LLM shards (stage 2).",
)

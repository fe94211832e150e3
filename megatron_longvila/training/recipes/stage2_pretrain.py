"""Stage 2, pre-training: projector and LLM learn, on captions and interleaved image-text."""

from .base import Recipe

RECIPE = Recipe(
    name="pretrain", stage=2, freeze="pretrain", template="plain",
    data="image/video captions and interleaved image-text documents (MMC4, COYO, ShareGPT4V style)",
    seq_length=4096, global_batch_size=1024, lr=5e-5, min_lr=0.0, weight_decay=0.0, previous="align",
    notes="The vision encoder stays frozen; the LLM learns to read visual tokens.",
)

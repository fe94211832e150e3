"""Stage 1, multi-modal alignment: only the projector learns, on image-caption pairs."""

from .base import Recipe

RECIPE = Recipe(
    name="align", stage=1, freeze="align", template="plain",
    data="image-caption pairs (LLaVA-CC3M-Pretrain-595K style): <image> then its caption",
    seq_length=4096, global_batch_size=256, lr=1e-3, min_lr=0.0, num_frames=None,
    notes="A high learning rate is safe: the encoder and the LLM are frozen, only the 2x2-downsample projector moves.",
)

"""Stage 3, short supervised fine-tuning: everything learns, on image and short-video instructions."""

from .base import Recipe

RECIPE = Recipe(
    name="short_sft", stage=3, freeze="short_sft", template="chatml",
    data="image and short-video instruction data (conversations with <image>/<video>)",
    seq_length=4096, global_batch_size=128, lr=2e-5, min_lr=0.0, num_frames=8, previous="pretrain",
    notes="The encoder unfreezes here; the learning rate drops to keep it close to its pre-trained weights.",
)

"""The records that flow from the dataset to the model: a tokenized sample and its media."""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100
"""Label of every position that carries no loss (PyTorch's cross-entropy default ignore_index)."""


@dataclasses.dataclass(slots=True)
class MediaItem:
    """One image or video of a sample, not yet decoded."""

    kind: str
    """"image" or "video"."""
    path: str
    """The media file (absolute, or as the manifest resolved it)."""
    frame_indices: list[int]
    """Frames the sample uses, in token order (an image has the single frame [0])."""
    frame_offsets: list[int]
    """Token position in `input_ids` where each frame's visual tokens start (one entry per frame)."""
    tokens_per_frame: int
    """Visual tokens per frame: positions frame_offsets[j] .. frame_offsets[j] + tokens_per_frame - 1."""
    fps: float | None = None
    """The video's frame rate (None for images)."""
    info: object | None = None
    """The video's probe (data.video.VideoInfo) from when the sample was read: decoding takes it instead of probing
    the file again (None: not probed, e.g. an image)."""

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    def token_positions(self, frame: int) -> range:
        """Positions in `input_ids` of frame `frame`'s visual tokens."""
        start = self.frame_offsets[frame]
        return range(start, start + self.tokens_per_frame)

    def shifted(self, offset: int) -> "MediaItem":
        """The same item with its token positions moved by `offset` (used when packing)."""
        return dataclasses.replace(self, frame_offsets=[o + offset for o in self.frame_offsets])


@dataclasses.dataclass(slots=True)
class Sample:
    """A tokenized sample. Labels are aligned with input_ids (not shifted: the trainer shifts)."""

    input_ids: torch.Tensor
    """LongTensor [seq]: text ids, with `tokens_per_frame` image-token ids (plus an optional separator) per frame."""
    labels: torch.Tensor
    """LongTensor [seq]: the token to learn at each position, IGNORE_INDEX outside assistant turns."""
    media: list[MediaItem]
    """Images and videos in placeholder order."""
    loss_weight: float = 1.0
    """Weight of this sample's tokens in the loss (video-grounded vs text-only balancing)."""
    sample_id: str = ""
    """The manifest's `id` (or the line number when it has none)."""
    index: int = -1
    """Position of the sample in its dataset (the manifest line number, 0-based)."""

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_frames(self) -> int:
        return sum(m.num_frames for m in self.media)

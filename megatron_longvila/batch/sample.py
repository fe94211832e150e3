"""What LongVILA trains on: samples, their media, and the packed micro-batch (host tensors, before any plan).

    IGNORE_INDEX                 label of positions that carry no loss
    Media, LongVILASample        one image or video; one sample (ids, labels, media, weight)
    FrameSlot, MicroBatch        one frame of a micro-batch; packed samples, one sequence, one sharding plan
    shift_targets(labels, weights, seq_lens) -> (targets, weights)   next-token targets inside each document

`MicroBatch.from_samples` packs samples (video, image and text-only alike); `MicroBatch.from_packed` takes the data
pipeline's `PackedSequence` and the decoded pixels of its media. The documented import path of these names is
`megatron_longvila.models.longvila`, which re-exports them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..data.sample import IGNORE_INDEX
from ..errors import LongVILAInputError

__all__ = ["IGNORE_INDEX", "LongVILAInputError", "Media", "LongVILASample", "FrameSlot", "MicroBatch",
           "shift_targets"]


@dataclass
class Media:
    """One image (n = 1) or video of a sample."""

    token_positions: torch.Tensor
    """LongTensor [n, t]: positions in the sample's input_ids of each frame's t visual tokens, in the
    projector's output order (row-major over the downsampled grid)."""
    frames: Optional[torch.Tensor] = None
    """[n, 3, H, W] pixels, or None on ranks that encode none of them (give `frame_size` then)."""
    frame_size: Optional[Tuple[int, int]] = None
    """(H, W) of the frames; taken from `frames` when given."""
    kind: str = "video"
    """"image" or "video" (informational: both are encoded alike)."""
    loader: Optional[Callable[[List[int]], torch.Tensor]] = None
    """Optional: frame numbers (of this item) -> their pixels [k, 3, H, W]; with `frames=None`, inference decodes
    only the frames stage 1 gives this rank through it."""


@dataclass
class LongVILASample:
    """One training sample as the model takes it."""

    input_ids: torch.Tensor
    """LongTensor [L]: text ids with t media-token ids per frame (and optional separators)."""
    labels: torch.Tensor
    """LongTensor [L], aligned with input_ids (not shifted), IGNORE_INDEX where nothing is learned."""
    media: List[Media] = field(default_factory=list)
    """Images and videos in placeholder order (empty for text-only samples)."""
    loss_weight: float = 1.0
    """Weight of each of this sample's learned tokens."""


@dataclass
class FrameSlot:
    """One frame of a micro-batch."""

    positions: torch.Tensor
    """LongTensor [t]: the frame's visual-token positions in the packed sequence."""
    height: int
    """Frame height in pixels."""
    width: int
    """Frame width in pixels."""
    pixels: Optional[torch.Tensor] = None
    """[3, H, W], required on the rank that encodes this frame."""
    source: Optional[Tuple["Media", int]] = None
    """(media item, frame number in it): where the pixels come from when a loader is given."""


@dataclass
class MicroBatch:
    """Packed samples: one sequence, one sharding plan."""

    input_ids: torch.Tensor
    """LongTensor [T]."""
    labels: torch.Tensor
    """LongTensor [T], aligned with input_ids (the model shifts within each document)."""
    loss_weights: torch.Tensor
    """FloatTensor [T]: weight of learning labels[t] (0 where labels[t] is IGNORE_INDEX)."""
    position_ids: torch.Tensor
    """LongTensor [T]: position inside each document (restarts at 0), for RoPE."""
    seq_lens: List[int]
    """Lengths of the packed documents (the argument of `plan_sequence`)."""
    frames: List[FrameSlot]
    """Every frame and image of the micro-batch, in sequence order."""
    sample_ids: List[str] = field(default_factory=list)
    """Ids of the packed samples (for messages that name the data), when known."""

    @classmethod
    def from_samples(cls, samples: Sequence[LongVILASample]) -> "MicroBatch":
        """Pack samples (video, image and text-only alike) into one micro-batch."""
        if not samples:
            raise LongVILAInputError("MicroBatch.from_samples: no samples")
        ids, labels, weights, pos, frames, lens = [], [], [], [], [], []
        offset = 0
        for i, s in enumerate(samples):
            n = int(s.input_ids.numel())
            if s.input_ids.dim() != 1 or s.labels.shape != s.input_ids.shape:
                raise LongVILAInputError(f"sample {i}: input_ids and labels must be 1-D of equal length, got "
                                         f"{tuple(s.input_ids.shape)} and {tuple(s.labels.shape)}")
            ids.append(s.input_ids.long())
            labels.append(s.labels.long())
            weights.append((s.labels != IGNORE_INDEX).float() * float(s.loss_weight))
            pos.append(torch.arange(n))
            for j, m in enumerate(s.media):
                frames.extend(_media_frames(m, offset, n, f"sample {i} media {j}"))
            lens.append(n)
            offset += n
        return cls(input_ids=torch.cat(ids), labels=torch.cat(labels), loss_weights=torch.cat(weights),
                   position_ids=torch.cat(pos), seq_lens=lens, frames=frames)

    @classmethod
    def from_packed(cls, packed, frames: Sequence[Optional[torch.Tensor]],
                    frame_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> "MicroBatch":
        """From the data pipeline's `PackedSequence` and the decoded pixels of its media.

        Args:
            packed: `megatron_longvila.data.packing.PackedSequence`.
            frames: per media item of `packed.media`, [n, 3, H, W] pixels, or None where this rank encodes none
                of its frames.
            frame_sizes: per media item, (H, W); required for items whose frames are None.
        """
        if len(frames) != len(packed.media):
            raise LongVILAInputError(f"{len(frames)} frame tensors for {len(packed.media)} media items")
        slots = []
        for j, (m, px) in enumerate(zip(packed.media, frames)):
            pos = torch.stack([torch.as_tensor(list(m.token_positions(k))) for k in range(m.num_frames)]) \
                if m.num_frames else torch.zeros(0, m.tokens_per_frame, dtype=torch.long)
            size = None if frame_sizes is None else tuple(frame_sizes[j])
            slots.extend(_media_frames(Media(token_positions=pos, frames=px, frame_size=size, kind=m.kind), 0,
                                       len(packed), f"media {j}"))
        return cls(input_ids=packed.input_ids.long(), labels=packed.labels.long(),
                   loss_weights=packed.loss_weights.float(), position_ids=packed.position_ids.long(),
                   seq_lens=list(packed.seq_lens), frames=slots, sample_ids=list(getattr(packed, "sample_ids", [])))

    @property
    def total_len(self) -> int:
        return int(self.input_ids.numel())


def _media_frames(m: Media, offset: int, sample_len: int, where: str) -> List[FrameSlot]:
    pos = torch.as_tensor(m.token_positions, dtype=torch.long)
    if pos.dim() != 2:
        raise LongVILAInputError(f"{where}: token_positions must be [frames, tokens_per_frame], got {tuple(pos.shape)}")
    n = pos.shape[0]
    if m.frames is not None:
        if m.frames.dim() != 4 or m.frames.shape[0] != n or m.frames.shape[1] != 3:
            raise LongVILAInputError(f"{where}: frames must be [{n}, 3, H, W] for {n} frames of token positions, "
                                     f"got {tuple(m.frames.shape)}")
        h, w = int(m.frames.shape[2]), int(m.frames.shape[3])
        if m.frame_size is not None and tuple(m.frame_size) != (h, w):
            raise LongVILAInputError(f"{where}: frame_size {m.frame_size} disagrees with frames {h}x{w}")
    elif m.frame_size is not None:
        h, w = (int(v) for v in m.frame_size)
    else:
        raise LongVILAInputError(f"{where}: give frames or frame_size (the encoder cost and token count need it)")
    if n and (int(pos.min()) < 0 or int(pos.max()) >= sample_len):
        raise LongVILAInputError(f"{where}: token positions outside the sample's {sample_len} tokens")
    return [FrameSlot(positions=pos[k] + offset, height=h, width=w,
                      pixels=None if m.frames is None else m.frames[k], source=(m, k)) for k in range(n)]


def shift_targets(labels: torch.Tensor, weights: torch.Tensor, seq_lens: Sequence[int]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets on the whole packed sequence: position t learns labels[t + 1] of the same document.

    The last position of every document learns nothing (its next token belongs to another document).
    Returns (targets with IGNORE_INDEX, weights), both aligned with the input positions.
    """
    total = int(labels.numel())
    targets = torch.full_like(labels, IGNORE_INDEX)
    w = torch.zeros_like(weights)
    targets[:-1] = labels[1:]
    w[:-1] = weights[1:]
    ends = torch.cumsum(torch.tensor(list(seq_lens)), 0) - 1
    if int(ends[-1]) != total - 1:
        raise LongVILAInputError(f"seq_lens {list(seq_lens)} do not add up to the {total} tokens of the sequence")
    targets[ends] = IGNORE_INDEX
    w[ends] = 0
    w = torch.where(targets == IGNORE_INDEX, torch.zeros_like(w), w)
    return targets, w

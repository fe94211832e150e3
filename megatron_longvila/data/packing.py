"""Masked sequence packing: several samples in one sequence that never attend to each other.

A packed sequence concatenates samples and records their lengths (`seq_lens`), which is all the
attention needs: `plan_sequence(mesh, seq_lens)` builds the per-document sharding plan and the attention
keeps documents apart. Position ids restart at 0 for every sample, so each sample sees the positions it
would see alone. Per-token loss weights carry each sample's `loss_weight`, optionally divided by its
number of learned tokens so that every sample (a long video answer or a one-line text reply) counts the
same in the loss, as Large World Model training balances its mixed batches.

A sample's first label is never learned: position t predicts labels[t + 1] of the same document, and nothing
precedes the first token (the step's `batch.sample.shift_targets`). Its weight is 0 here, so a per-sample weight
divides by the labels actually learned.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch

from megatron_longvila.data.sample import IGNORE_INDEX, MediaItem, Sample


@dataclasses.dataclass(slots=True)
class PackedSequence:
    """Samples laid end to end."""

    input_ids: torch.Tensor
    """LongTensor [total]."""
    labels: torch.Tensor
    """LongTensor [total], IGNORE_INDEX where nothing is learned; not shifted."""
    position_ids: torch.Tensor
    """LongTensor [total], 0.. within each sample."""
    loss_weights: torch.Tensor
    """FloatTensor [total]: weight of learning each position's label (0 where labels are IGNORE_INDEX and at each
    sample's first position, whose label no position predicts)."""
    seq_lens: list[int]
    """Length of each packed sample, in order: the argument of `plan_sequence`."""
    media: list[MediaItem]
    """Every sample's media, token offsets moved to positions in this sequence."""
    sample_ids: list[str]
    """The packed samples' ids."""
    indices: list[int]
    """The packed samples' dataset indices."""

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative lengths [0, l0, l0+l1, ...] as int32 (the varlen-attention convention)."""
        out = torch.zeros(len(self.seq_lens) + 1, dtype=torch.int32)
        out[1:] = torch.cumsum(torch.tensor(self.seq_lens, dtype=torch.int64), 0).to(torch.int32)
        return out

    @property
    def num_frames(self) -> int:
        return sum(m.num_frames for m in self.media)


LOSS_WEIGHTINGS = ("token", "sample")


def concat_samples(samples: Sequence[Sample], *, loss_weighting: str = "token") -> PackedSequence:
    """Pack exactly these samples into one sequence.

    Args:
        loss_weighting: "token": every learned token of a sample has weight `loss_weight`; "sample":
            `loss_weight / (learned tokens of the sample)`, so each sample's loss sums to its weight. Learned
            tokens: labels other than IGNORE_INDEX after the sample's first position.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if not samples:
        raise ValueError("concat_samples: no samples")
    ids, labels, pos, weights, media = [], [], [], [], []
    offset = 0
    for s in samples:
        n = len(s)
        ids.append(s.input_ids)
        labels.append(s.labels)
        pos.append(torch.arange(n, dtype=torch.long))
        learned = s.labels != IGNORE_INDEX
        learned[:1] = False  # no position predicts a document's first token
        w = float(s.loss_weight)
        if loss_weighting == "sample":
            w = w / max(int(learned.sum()), 1)
        weights.append(learned.to(torch.float32) * w)
        media.extend(m.shifted(offset) for m in s.media)
        offset += n
    return PackedSequence(
        input_ids=torch.cat(ids),
        labels=torch.cat(labels),
        position_ids=torch.cat(pos),
        loss_weights=torch.cat(weights),
        seq_lens=[len(s) for s in samples],
        media=media,
        sample_ids=[s.sample_id for s in samples],
        indices=[s.index for s in samples],
    )


def pack_samples(
    samples: Iterable[Sample],
    max_seq_len: int,
    *,
    strategy: str = "sequential",
    loss_weighting: str = "token",
) -> list[PackedSequence]:
    """Pack samples into sequences of at most `max_seq_len` tokens.

    Args:
        strategy: "sequential" keeps the input order and starts a new sequence when the next sample does
            not fit (deterministic in the data order, which resumption relies on); "first_fit" places
            longest samples first into the first sequence with room (fuller sequences, order changed).
        loss_weighting: see `concat_samples`.

    Raises:
        ValueError: a sample is longer than max_seq_len (the dataset skips those as "too_long").
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    samples = list(samples)
    for s in samples:
        if len(s) > max_seq_len:
            raise ValueError(f"sample {s.sample_id!r} has {len(s)} tokens > max_seq_len {max_seq_len}")
        if len(s) == 0:
            raise ValueError(f"sample {s.sample_id!r} is empty")
    bins: list[list[Sample]] = []
    if strategy == "sequential":
        used = 0
        for s in samples:
            if not bins or used + len(s) > max_seq_len:
                bins.append([])
                used = 0
            bins[-1].append(s)
            used += len(s)
    elif strategy == "first_fit":
        room: list[int] = []
        for s in sorted(samples, key=len, reverse=True):
            for b, free in enumerate(room):
                if len(s) <= free:
                    bins[b].append(s)
                    room[b] -= len(s)
                    break
            else:
                bins.append([s])
                room.append(max_seq_len - len(s))
    else:
        raise ValueError(f"unknown packing strategy {strategy!r}; use 'sequential' or 'first_fit'")
    return [concat_samples(b, loss_weighting=loss_weighting) for b in bins]

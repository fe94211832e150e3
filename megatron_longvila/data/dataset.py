"""The training dataset: manifest lines -> tokenized samples with selected (not yet decoded) frames.

Preparing a sample probes its videos (container headers, no pictures), selects frame indices and
tokenizes the conversation; pixels are decoded later by `decode_media`, for only the frames stage 1
assigns to this rank. A bad sample raises `DataError` inside preparation; iteration counts it under its
reason, logs the first of each reason, and moves on without touching any other sample. When the
skipped fraction passes `max_skip_fraction` the run stops with `SkipThresholdExceeded`.

The iteration position is part of the training state (`state_dict` / `load_state_dict`): a resumed
run sees exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch

from megatron_longvila.data.conversation import MediaFrames, check_template, tokenize_conversation
from megatron_longvila.errors import DataError, SkipThresholdExceeded
from megatron_longvila.data.frames import select_frame_indices
from megatron_longvila.data.manifest import Manifest, ManifestRecord
from megatron_longvila.data.packing import PackedSequence, concat_samples
from megatron_longvila.data.sample import Sample
from megatron_longvila.data.video import SUPPORTED_CODECS, decode_frames, probe_video
from megatron_longvila.runtime.file_view import check_readable

logger = logging.getLogger("megatron_longvila.data")


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    """How samples are read, sampled, tokenized and checked."""

    template: str = "chatml"
    """Chat template name (see conversation.TEMPLATES)."""
    tokens_per_frame: int = 196
    """Visual tokens per frame after the projector; each frame placeholder expands to this many ids."""
    frame_separator: bool | str = False
    """After each frame's visual tokens: True, the `<frame_sep>` token; a string, its tokens (VILA: "\n")."""
    num_frames: int | None = 8
    """Frames per video, spread uniformly (a manifest line's num_frames/fps overrides it)."""
    fps: float | None = None
    """Sample videos at this rate instead of a fixed count (set num_frames=None)."""
    max_frames: int | None = 1024
    """Cap on the frames taken from one video."""
    max_video_frames: int | None = None
    """Videos with more source frames are skipped as too_long (None: no limit)."""
    max_video_duration_s: float | None = None
    """Videos longer than this are skipped as too_long (None: no limit)."""
    max_seq_len: int | None = None
    """Samples with more tokens are skipped as too_long (None: no limit)."""
    video_backend: str = "auto"
    """Decoder used to check codecs: a codec this backend cannot decode is unsupported_codec."""
    allowed_codecs: tuple[str, ...] | None = None
    """Codecs accepted (None: every codec the configured backend decodes)."""
    video_loss_weight: float = 1.0
    """Loss weight of samples with at least one image or video (a manifest loss_weight overrides it)."""
    text_loss_weight: float = 1.0
    """Loss weight of text-only samples (a manifest loss_weight overrides it)."""
    max_skip_fraction: float = 0.1
    """Stop when more than this fraction of the samples seen so far was skipped."""
    min_samples_for_skip_check: int = 100
    """Samples to see before the skip fraction is judged (one early bad file must not stop a run)."""
    shuffle: bool = True
    """Visit samples in a seeded random order, a new one each epoch."""
    seed: int = 1234
    """Seed of the visiting order."""

    def __post_init__(self):
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("DataConfig: set num_frames or fps, not both (num_frames=None to sample by fps)")
        if self.tokens_per_frame < 1:
            raise ValueError(f"DataConfig.tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"DataConfig.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.video_backend not in ("auto", "pyav", "dali_cpu", "dali_gpu"):
            raise ValueError(f"DataConfig.video_backend: unknown backend {self.video_backend!r}")


class VideoTextDataset:
    """Samples from a manifest (or any source with `__len__` and `record(i)`), for one data-parallel rank.

    Args:
        source: a manifest path, a `Manifest`, or a shard source from `energon.ShardSource`.
        tokenizer: a tokenizer from `megatron_longvila.data.tokenizer`.
        config: DataConfig.
        dp_rank, dp_size: this rank takes every dp_size-th sample of the epoch's order. All CP ranks of a
            data-parallel replica use the same dp_rank (they share samples and split their frames).
    """

    def __init__(self, source, tokenizer, config: DataConfig | None = None, *, dp_rank: int = 0, dp_size: int = 1,
                 log_skips: bool = True):
        if isinstance(source, (str, os.PathLike)):
            source = Manifest(source)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.source = source
        self.tokenizer = tokenizer
        self.config = config or DataConfig()
        check_template(tokenizer, self.config.template)  # at start-up, not at the first sample
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch = 0
        self.position = 0  # next slot of this rank's share of the epoch order
        self.ok = 0
        self.skipped: Counter[str] = Counter()
        self._logged: set[str] = set()
        # The CP / TP ranks of a data-parallel replica read the same samples: one of them tells.
        self.log_skips = log_skips

    def __len__(self) -> int:
        return len(self.source)

    # ---- one sample ----------------------------------------------------------------------------

    def prepare(self, index: int) -> Sample:
        """Sample `index` tokenized, frames selected. Raises DataError for a bad sample."""
        return self.prepare_record(self.source.record(index), index)

    def prepare_record(self, record: ManifestRecord, index: int = -1) -> Sample:
        """A record from any reader (this dataset's source, or Energon's loader) prepared as `prepare` does."""
        cfg = self.config
        media: list[MediaFrames] = []
        infos: list = []
        allowed = cfg.allowed_codecs
        if allowed is None:
            allowed = tuple(SUPPORTED_CODECS["pyav" if cfg.video_backend == "auto" else cfg.video_backend])
        for ref in record.media:
            if ref.kind == "video":
                info = probe_video(
                    ref.path, max_frames=cfg.max_video_frames, max_duration_s=cfg.max_video_duration_s, allowed_codecs=allowed
                )
                num_frames, fps = record.num_frames, record.fps
                if num_frames is None and fps is None:
                    num_frames, fps = cfg.num_frames, cfg.fps
                max_frames = record.max_frames if record.max_frames is not None else cfg.max_frames
                indices = select_frame_indices(
                    info.num_frames, info.fps, num_frames=num_frames, fps=fps, max_frames=max_frames,
                    start_s=record.start_s, end_s=record.end_s,
                )
                media.append(MediaFrames("video", ref.path, indices, info.fps))
                infos.append(info)
            else:
                check_image(ref.path)
                media.append(MediaFrames("image", ref.path, [0]))
                infos.append(None)
        weight = record.loss_weight
        if weight is None:
            weight = cfg.video_loss_weight if media else cfg.text_loss_weight
        sample = tokenize_conversation(
            record.conversations, media, self.tokenizer, cfg.template,
            tokens_per_frame=cfg.tokens_per_frame, frame_separator=cfg.frame_separator,
            max_seq_len=cfg.max_seq_len, loss_weight=weight, sample_id=record.id, index=index,
        )
        # Each file is probed once per sample: decoding takes the probe from here.
        for item, info in zip(sample.media, infos):
            item.info = info
        return sample

    # ---- iteration -----------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in visiting order."""
        n = len(self.source)
        if self.config.shuffle:
            perm = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        return perm[self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[Sample]:
        """Good samples from the current position to the end of the epoch (then the epoch advances)."""
        order = self.order(self.epoch)
        while self.position < len(order):
            index = int(order[self.position])
            self.position += 1
            try:
                sample = self.prepare(index)
            except DataError as e:
                self._skip(index, e)
                continue
            self.ok += 1
            yield sample
        self.epoch += 1
        self.position = 0

    def iter_forever(self) -> Iterator[Sample]:
        """Epoch after epoch (stops only by SkipThresholdExceeded, or when no sample is good)."""
        while True:
            before, whole = self.ok, self.position == 0
            yield from self
            # A resume may start at the very end of an epoch (nothing left in it): only a whole epoch counts.
            if self.ok == before and whole:
                from megatron_longvila.data.errors import advice

                top = max(self.skipped, key=self.skipped.get) if self.skipped else None
                hint = f"; most are {top!r}: {advice(top)}" if top else ""
                raise SkipThresholdExceeded(f"a whole epoch of {len(self.source)} samples gave no usable sample: "
                                            f"{self.summary()}{hint}")

    def _skip(self, index: int, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if error.reason not in self._logged:
            self._logged.add(error.reason)
            if self.log_skips:
                logger.warning("skipping sample %d: %s (further %r skips are counted, not logged)", index, error, error.reason)
        seen = self.ok + sum(self.skipped.values())
        bad = sum(self.skipped.values())
        cfg = self.config
        if seen >= cfg.min_samples_for_skip_check and bad / seen > cfg.max_skip_fraction:
            raise SkipThresholdExceeded(
                f"{bad} of {seen} samples skipped ({bad / seen:.1%} > max_skip_fraction {cfg.max_skip_fraction:.1%}); "
                f"reasons: {dict(self.skipped)}. Fix the dataset (tools/check_data.py lists the bad lines) "
                "or raise DataConfig.max_skip_fraction."
            )

    def summary(self) -> dict:
        """{"ok": N, "skipped": {reason: count}} for the samples visited so far."""
        return {"ok": self.ok, "skipped": dict(sorted(self.skipped.items()))}

    # ---- resumption ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The data position: save it with the model; `load_state_dict` continues from it exactly."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "ok": self.ok,
            "skipped": dict(self.skipped),
            "num_samples": len(self.source),
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_samples", len(self.source)), ("seed", self.config.seed), ("shuffle", self.config.shuffle),
                          ("dp_size", self.dp_size), ("dp_rank", self.dp_rank)):
            if state.get(key) != mine:
                raise ValueError(
                    f"data state does not match this dataset: saved {key}={state.get(key)!r}, now {mine!r} "
                    "(a resumed run must read the same data with the same seed and data-parallel layout)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.ok = int(state["ok"])
        self.skipped = Counter(state["skipped"])
        self._logged = set(self.skipped)


def _check_view(path: str) -> None:
    """A read error this rank's view of the file system gives (runtime.file_view) as the DataError a failed read is."""
    try:
        check_readable(path)
    except FileNotFoundError:
        raise DataError("missing_file", f"{path}: no such file") from None
    except OSError as e:
        raise DataError("unreadable_file", f"{path}: {e.strerror or e}") from None


def check_image(path: str) -> None:
    """Cheap checks of an image file (header and integrity, no full decode). Raises DataError."""
    _check_view(path)
    if not os.path.exists(path):
        raise DataError("missing_file", f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError("empty_file", f"{path}: zero bytes")
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
        raise DataError("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


def load_image(path: str) -> torch.Tensor:
    """Decode an image to uint8 [H, W, 3] RGB. Raises DataError("corrupt_image")."""
    from PIL import Image

    _check_view(path)
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    except FileNotFoundError:
        raise DataError("missing_file", f"{path}: no such file") from None
    except Exception as e:
        raise DataError("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


# ---- packing over a stream ----------------------------------------------------------------------


class PackedIterator:
    """Packs a dataset's samples, in order, into sequences of at most `max_seq_len` tokens.

    Resumable: `state_dict` holds the dataset's position as it was before the first sample not yet
    emitted, so a resumed run re-reads those samples and emits the same sequences.
    """

    def __init__(self, dataset: VideoTextDataset, max_seq_len: int, *, loss_weighting: str = "token"):
        limit = dataset.config.max_seq_len
        if limit is None or limit > max_seq_len:
            raise ValueError(
                f"PackedIterator(max_seq_len={max_seq_len}) needs DataConfig.max_seq_len <= {max_seq_len} "
                f"(got {limit}) so that longer samples are skipped as too_long before packing"
            )
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        self.loss_weighting = loss_weighting
        self._resume_state = dataset.state_dict()

    def __iter__(self) -> Iterator[PackedSequence]:
        pending: list[Sample] = []
        used = 0
        self._resume_state = self.dataset.state_dict()
        stream = self.dataset.iter_forever()
        while True:
            before = self.dataset.state_dict()
            sample = next(stream)
            if pending and used + len(sample) > self.max_seq_len:
                packed = concat_samples(pending, loss_weighting=self.loss_weighting)
                # The sample just read starts the next sequence: a resumed run starts before reading it.
                self._resume_state = before
                pending, used = [], 0
                yield packed
            pending.append(sample)
            used += len(sample)

    def state_dict(self) -> dict:
        return dict(self._resume_state)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._resume_state = dict(state)


# ---- decoding the frames this rank encodes ---------------------------------------------------------


@dataclasses.dataclass(slots=True)
class DecodedFrames:
    """Pixels of some frames of a sample (or a packed sequence)."""

    keys: list[tuple[int, int]]
    """(media item, frame within the item) of each output, in output order."""
    pixels: torch.Tensor | list[torch.Tensor]
    """float32 [k, 3, S, S] after the image processor; without one, a list of uint8 [H, W, 3]."""
    failed: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """Frames that could not be decoded and were blanked (only with on_error="blank")."""
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    """Media item -> why its frames could not be decoded (the DataError's message; only with on_error="blank")."""


def frame_keys(sample: Sample | PackedSequence) -> list[tuple[int, int]]:
    """Every frame of the sample as (media item, frame within item): global frame g is keys[g]."""
    return [(m, j) for m, item in enumerate(sample.media) for j in range(item.num_frames)]


def decode_media(
    sample: Sample | PackedSequence,
    frame_subset: Sequence[int] | Sequence[tuple[int, int]] | None = None,
    *,
    processor=None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    on_error: str = "raise",
) -> DecodedFrames:
    """Decode only the frames in `frame_subset` (the frames stage 1 assigned to this rank).

    Args:
        sample: a Sample or PackedSequence whose media carry selected frame indices.
        frame_subset: global frame numbers (positions in `frame_keys(sample)`) or (media, frame) pairs;
            None decodes every frame.
        processor: e.g. SiglipImageProcessor; applied to the decoded frames.
        backend, device: see `video.decode_frames`.
        on_error: "raise" (DataError) or "blank": a frame that fails to decode becomes a mean-colour frame
            (zeros after SigLIP normalization) and is listed in `failed`, so one file read at training
            time cannot desynchronize the ranks that share a step.
    """
    all_keys = frame_keys(sample)
    if frame_subset is None:
        keys = all_keys
    else:
        keys = [all_keys[k] if isinstance(k, (int, np.integer)) else (int(k[0]), int(k[1])) for k in frame_subset]
    if on_error not in ("raise", "blank"):
        raise ValueError(f"on_error must be 'raise' or 'blank', got {on_error!r}")
    by_item: dict[int, list[int]] = {}
    for m, j in keys:
        by_item.setdefault(m, []).append(j)
    decoded: dict[tuple[int, int], torch.Tensor] = {}
    failed: list[tuple[int, int]] = []
    errors: dict[int, str] = {}
    for m, js in by_item.items():
        item = sample.media[m]
        try:
            if item.kind == "video":
                frames = decode_frames(item.path, [item.frame_indices[j] for j in js], backend=backend, device=device,
                                       info=getattr(item, "info", None))
            else:
                frames = load_image(item.path)[None].expand(len(js), -1, -1, -1)
        except DataError as e:
            if on_error == "raise":
                raise
            # The caller names the sample and the rank (training.data_feed): here only at debug level.
            logger.debug("blanking %d frames of %s: %s", len(js), item.path, e)
            failed.extend((m, j) for j in js)
            errors[m] = str(e)
            continue
        if processor is not None:
            frames = processor(frames)
        if device is not None:
            frames = frames.to(device)
        for j, frame in zip(js, frames):
            decoded[(m, j)] = frame
    if processor is None:
        if failed:
            raise ValueError("decode_media: on_error='blank' needs a processor (the blank frame's size is the processor's)")
        return DecodedFrames(keys, [decoded[k] for k in keys])
    size = processor.size
    # The mean-colour frame normalizes to (mean - mean) / std = 0: blanks are zeros.
    out = torch.zeros((len(keys), 3, size, size), dtype=torch.float32, device=device)
    for row, key in enumerate(keys):
        if key in decoded:
            out[row] = decoded[key]
    return DecodedFrames(keys, out, failed, errors)

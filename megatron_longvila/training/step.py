"""The LongVILA training step for Megatron's schedules, shared by the example script, the `--use-megatron-training`
path and inference.

    StepConfig                              how a step plans its micro-batches (lengths, padding, decoding)
    LongVILAStep(config, model)
        .plan(packed) -> PlannedMicroBatch               this rank's plan of one packed sequence (host)
        .decode(packed, planned, mapper=map) -> (failed, errors)   this rank's frames (first pipeline stage)
        .drop_failed(packed, planned, failed) -> PlannedMicroBatch  documents whose media failed, out of the loss
        .stage(planned) / .to_device(planned)            pixels gathered (pinned on CUDA), then moved
        .finish_step(planned, counts=None)               the step's loss scale and skip check (one host all-reduce)
        .forward_step(data_iterator, model)              Megatron's forward_step_func
        .loss_func(mb, output_tensor)                    Megatron's per-token loss triple
    drop_documents_with_failed_media(...)   decode failures after packing: drop their documents from the loss

The data iterator a schedule reads is training.data_feed.StepFeed: it takes a step's packed sequences from the
replica's reader, plans and decodes them with the methods above (ahead of the step with --num-workers), agrees on
decode failures over the replica, and calls `finish_step` when the step takes them:
1. each packed sequence is planned (`batch.microbatch.plan_microbatch`); the first pipeline stage decodes only the
   frames stage 1 gives this rank;
2. every rank of the replica agrees on decode failures (a host collective) and drops those documents;
3. the step's loss weight and learned-target count are summed over the micro-batches and all-reduced over
   DP x CP once (a host collective of a few numbers) -- see "Fractional loss weights";
4. each planned micro-batch is moved to the model's device when the schedule asks for it; Megatron's schedule
   runs `forward_step` on each, which only calls the model.

Fractional loss weights (per-sample weighting, a manifest's `loss_weight`) through Megatron's schedules: with
`calculate_per_token_loss` Megatron sums the loss of every micro-batch, sums the integer token counts the loss
function returns over micro-batches and DP x CP, and divides the gradients by that count N. Counting weights
instead would need fractional counts in megatron-core's int32 tensor. So the count stays the integer number of
learned targets, and each micro-batch's loss sum of weight x CE is multiplied by N / W, W being the step's total
weight over DP x CP: Megatron's division by N then gives exactly sum(weight x CE) / W, the weighted global
mean, and its logged loss (sum of reports / sum of counts) is the same mean. With unit weights N == W and the
factor is exactly 1. The price is one all-reduce of a few numbers per step, on the host group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..attention.megatron_core import uses_fp8_attention
from ..batch.microbatch import PlannedMicroBatch, plan_microbatch
from ..batch.sample import IGNORE_INDEX, MicroBatch
from ..data.dataset import decode_media, frame_keys
from ..data.errors import REASONS
from ..data.errors import advice as advice_for
from ..data.image_processor import SiglipImageProcessor
from ..errors import SkipThresholdExceeded, StepError
from ..parallel import comm
from ..parallel.state import get_mmsp_mesh
from ..planning.flops import Trains, sequence_flops
from ..planning.memory import ModelShape
from ..runtime.modules import model_device, unwrap_model

__all__ = ["StepConfig", "LongVILAStep", "StepCounts", "drop_documents_with_failed_media"]

logger = logging.getLogger("megatron_longvila.training")


@dataclass(kw_only=True)
class StepConfig:
    """How the step plans and decodes its micro-batches."""

    seq_length: int
    """--seq-length: the longest packed sequence, and the fixed length under uniform shards."""
    pad_id: int = 0
    """Token id of filler and pad tokens (the tokenizer's pad id)."""
    uniform_shards: bool = False
    """Every CP rank holds seq_length / CP tokens (PP > 1 or TP sequence parallelism need fixed shapes)."""
    pad_to_multiple: int = 1
    """With uniform shards, the local length is a multiple of this (TP under sequence parallelism)."""
    pipeline_parallel: bool = False
    """PP > 1: the loss lives on the last stage, which does not decode (it learns of decode failures from the
    replica's agreement, training.data_feed)."""
    image_size: int = 384
    """Side of the encoder's input frames."""
    image_mode: str = "pad"
    """SigLIP preprocessing: "pad" (VILA's pad-to-square) or "resize"."""
    image_mean: tuple = (0.5, 0.5, 0.5)
    """Per-channel mean of the normalization (the checkpoint's preprocessor; SigLIP: 0.5)."""
    image_std: tuple = (0.5, 0.5, 0.5)
    """Per-channel std of the normalization."""
    decode_backend: str = "auto"
    """Video decoder (data.video.decode_frames): auto, pyav, dali_cpu, dali_gpu."""
    totals_group: Optional[object] = None
    """Host (gloo) process group over DP x CP for the step totals; None: Megatron's."""
    max_skip_fraction: float = 1.0
    """Stop when more than this fraction of the samples read so far, over all data-parallel ranks, was skipped."""
    min_samples_for_skip_check: int = 20
    """Samples read (over all data-parallel ranks) before the skip fraction is judged."""


@dataclass(frozen=True)
class StepCounts:
    """What the replica's reader had read when it took a step's sequences (it travels with them to every rank of the
    replica, so every rank judges the skip fraction alike)."""

    ok: int = 0
    """Samples read and kept so far by this replica's stream."""
    skipped: Dict[str, int] = field(default_factory=dict)
    """Samples skipped so far, by reason (data.errors.REASONS)."""


class LongVILAStep:
    """Megatron's forward step for LongVILA (see the module docstring), for this rank's model (planning reads its
    vision config, media token, pipeline stage, MM-SP mesh and device)."""

    def __init__(self, config: StepConfig, model):
        self.config = config
        self.model = unwrap_model(model)
        self._processor = None
        self.blanked_media = 0
        """Media items blanked after failing to decode at training time (agreed over the replica)."""
        self._flops_model = None

    # -- preparing (host) ---------------------------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            self._processor = SiglipImageProcessor(self.config.image_size, mode=self.config.image_mode,
                                                   mean=self.config.image_mean, std=self.config.image_std)
        return self._processor

    def _plan(self, mb: MicroBatch) -> PlannedMicroBatch:
        cfg = self.config
        return plan_microbatch(self.model.visual_spec, mb, get_mmsp_mesh(self.model.config),
                               uniform=cfg.uniform_shards, pad_to_multiple=cfg.pad_to_multiple,
                               seq_length=cfg.seq_length if cfg.uniform_shards else None, pad_id=cfg.pad_id)

    def plan(self, packed) -> PlannedMicroBatch:
        """One packed sequence -> this rank's planned micro-batch (host tensors, frames not yet decoded)."""
        size = (self.config.image_size, self.config.image_size)
        return self._plan(MicroBatch.from_packed(packed, [None] * len(packed.media), [size] * len(packed.media)))

    def decode(self, packed, planned: PlannedMicroBatch, mapper: Callable = map, device=None,
               frames: Optional[List[int]] = None) -> Tuple[torch.Tensor, Dict[int, str]]:
        """Decode the frames stage 1 gave this rank (first pipeline stage only; `frames`: only these of them), one
        media item per `mapper` call (a thread pool's map decodes items in parallel). Returns (failed [media items]
        0/1, {media item: why}): a frame that cannot be read is blanked, so the ranks stay in step until they agree
        on it."""
        failed = torch.zeros(len(packed.media))
        errors: Dict[int, str] = {}
        mine = planned.frames_encoded if frames is None else frames
        if not (self.model.pre_process and mine):
            return failed, errors
        keys = frame_keys(packed)
        by_item: Dict[int, List[int]] = {}
        for g in mine:
            by_item.setdefault(keys[g][0], []).append(g)

        def one(frames: List[int]):
            return decode_media(packed, frames, processor=self.processor, backend=self.config.decode_backend,
                                device=device, on_error="blank")

        groups = list(by_item.values())
        for frames, decoded in zip(groups, mapper(one, groups)):
            for g, px in zip(frames, decoded.pixels):
                planned.set_pixels(g, px)
            for media, _ in decoded.failed:
                failed[media] = 1
            errors.update(decoded.errors)
        return failed, errors

    def drop_failed(self, packed, planned: PlannedMicroBatch, failed: torch.Tensor) -> PlannedMicroBatch:
        """`planned` without the documents whose media failed on any rank of the replica (`failed`, agreed): their
        loss weights and labels are zeroed and the sequence planned again (host only), the decoded pixels kept."""
        if not bool(failed.any()):
            return planned
        self.blanked_media += int(failed.sum())
        drop_documents_with_failed_media(planned.batch, packed, failed)
        pixels = {f: planned.batch.frames[f].pixels for f in planned.frames_encoded}
        replanned = self._plan(planned.batch)
        for f, px in pixels.items():
            replanned.set_pixels(f, px)
        return replanned

    def stage(self, planned: PlannedMicroBatch) -> PlannedMicroBatch:
        """Gather the pixels in the encoder's dtype, pinned where a CUDA device will take them (off the training
        thread under a data producer)."""
        m = self.model
        dtype = m.vision_model.conv1.weight.dtype if m.vision_model is not None else None
        return planned.stage(dtype, pin=model_device(m).type == "cuda")

    def to_device(self, planned: PlannedMicroBatch) -> PlannedMicroBatch:
        """The micro-batch on the model's device (asynchronous copies from pinned memory on CUDA)."""
        m = self.model
        dtype = m.vision_model.conv1.weight.dtype if m.vision_model is not None else None
        # FP8 attention's padded-layout coordinates go to the device with the rest: no host copy inside the model.
        return planned.to(model_device(m), dtype, coords=uses_fp8_attention(getattr(m, "config", None)))

    def sequence_figures(self, packed) -> Tuple[int, float]:
        """(real tokens, model FLOPs) of one packed sequence, for throughput and MFU: the FLOPs on the first pipeline
        stage (it holds the encoder; the loop counts one rank per replica), 0 elsewhere."""
        size = (self.config.image_size, self.config.image_size)
        mb = MicroBatch.from_packed(packed, [None] * len(packed.media), [size] * len(packed.media))
        return mb.total_len, self._sequence_flops(mb)

    def _sequence_flops(self, mb: MicroBatch) -> float:
        """The model FLOPs of one packed sequence from its own documents and frames."""
        m = self.model
        if not m.pre_process:
            return 0.0
        if self._flops_model is None:
            def trains(part):
                return part is not None and any(p.requires_grad for p in part.parameters())

            self._flops_model = (ModelShape.of(m), Trains(llm=trains(m.language_model),
                                                          projector=trains(m.projector),
                                                          vision=trains(m.vision_model)))
        shape, parts = self._flops_model
        return sequence_flops(shape, mb.seq_lens, [(f.height, f.width) for f in mb.frames], parts)["total"]

    def finish_step(self, planned: List[PlannedMicroBatch], dataset=None,
                    counts: Optional[StepCounts] = None) -> List[PlannedMicroBatch]:
        """Give a step's planned micro-batches the step's loss scale, learned targets / loss weight, both summed over
        the micro-batches and DP x CP, and judge the data's skip fraction over DP: one host all-reduce.

        counts: the replica's reading counts when the step was taken (StepCounts); else `dataset`'s current ones."""
        reasons = sorted(REASONS)
        if counts is None and dataset is not None:
            counts = StepCounts(ok=dataset.ok, skipped=dict(dataset.skipped))
        skipped = dict(counts.skipped) if counts is not None else {}
        totals = torch.tensor([sum(p.local_weight for p in planned), float(sum(p.local_count for p in planned)),
                               float(counts.ok if counts is not None else 0)]
                              + [float(skipped.get(r, 0)) for r in reasons], dtype=torch.float64)
        group = self.config.totals_group
        if group is None:
            from megatron.core import parallel_state as ps

            group = ps.get_data_parallel_group_gloo(with_context_parallel=True)
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size > 1:
            comm.all_reduce(totals, group, kind="step_totals")
        weight, count = float(totals[0]), float(totals[1])
        scale = count / weight if weight > 0 else 1.0
        for p in planned:
            p.step_scale = scale
        if counts is not None:
            # Every CP rank of a replica holds its reader's counts: counts over DP x CP are CP times the DP counts.
            cp = self.model.config.context_parallel_size
            ok = totals[2].item() / cp
            by_reason = {r: int(round(v / cp)) for r, v in zip(reasons, totals[3:].tolist()) if v}
            _check_skips(ok, by_reason, self.config)
        return planned

    # -- the schedule's side -------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        """Megatron's forward_step_func: one planned micro-batch through the model."""
        mb = next(data_iterator)
        if not isinstance(mb, PlannedMicroBatch):
            raise StepError(f"forward_step got a {type(mb).__name__}: wrap the data iterator with "
                            f"LongVILAStep.batches(iterator, num_microbatches)")
        output = model(mb, reduction="none")
        return output, partial(self.loss_func, mb)

    @staticmethod
    def loss_func(mb: PlannedMicroBatch, output_tensor):
        """(per-token CE, weights) -> Megatron's (loss sum, integer count, {"lm loss": [sum, count]}).

        Non-last pipeline stages never call it. The report stays local: Megatron's trainer (or the project's loop)
        reduces the step's reports once, after the schedule.
        """
        ce, weights = output_tensor
        if mb.step_scale is None:
            raise StepError("the micro-batch has no step scale: read it through LongVILAStep.batches(...) so the "
                            "step's weight totals are known before the loss")
        loss_sum = (ce.float() * weights.float()).sum() * mb.step_scale
        count = mb.count_tensor if mb.count_tensor is not None else torch.tensor(mb.local_count, dtype=torch.int)
        # float64, so reducing many micro-batches' reports over DP x CP adds no rounding of its own.
        report = torch.stack([loss_sum.detach().double(), count.double()])
        return loss_sum, count, {"lm loss": report}


def _check_skips(ok: float, by_reason: dict, cfg: StepConfig) -> None:
    bad = sum(by_reason.values())
    seen = ok + bad
    if seen < cfg.min_samples_for_skip_check or bad <= cfg.max_skip_fraction * seen:
        return
    top = max(by_reason, key=by_reason.get)
    advice = advice_for(top)
    raise SkipThresholdExceeded(
        f"{bad:.0f} of {seen:.0f} samples read so far (all data-parallel ranks) were skipped ({bad / seen:.0%} > "
        f"--max-skip-fraction {cfg.max_skip_fraction:g}); reasons: {by_reason}. Most are {top!r}: {advice}; or "
        f"raise --max-skip-fraction")


def drop_documents_with_failed_media(mb: MicroBatch, packed, failed: torch.Tensor) -> None:
    """Drop from the loss the documents whose media failed to decode (`failed[i]` for media item i).

    A file that passed the dataset's checks can still fail to decode at training time, on one rank, after every
    rank committed to this micro-batch. Its frames were blanked so the ranks stay in step; the documents that use
    them must not be learned from. The CP ranks have agreed on `failed` before this (every CP rank drops the same
    documents).
    """
    if not bool(failed.any()):
        return
    ends = torch.cumsum(torch.tensor(mb.seq_lens), 0)
    for media in failed.nonzero().flatten().tolist():
        doc = int(torch.searchsorted(ends, packed.media[media].frame_offsets[0], right=True))
        start = int(ends[doc - 1]) if doc else 0
        mb.labels[start:int(ends[doc])] = IGNORE_INDEX
        mb.loss_weights[start:int(ends[doc])] = 0
    # The rank that could not read the file names it (training.data_feed); the drop itself is the same everywhere.
    logger.debug("dropped the documents of %d media item(s) that failed to decode from this micro-batch's loss",
                 int(failed.sum()))

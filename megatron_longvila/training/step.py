"""The LongVILA training step for Megatron's schedules, shared by the example script, the `--use-megatron-training`
path and inference.

    StepConfig                              how a step plans its micro-batches (lengths, padding, decoding)
    LongVILAStep(config, model)
        .prepare(packed) -> PlannedMicroBatch            plan, decode this rank's frames, move to the device
        .batches(iterator, num_microbatches) -> StepBatches
        .forward_step(data_iterator, model)              Megatron's forward_step_func
        .loss_func(mb, output_tensor)                    Megatron's per-token loss triple
    StepBatches                             a data iterator that plans a whole step before its first micro-batch
    drop_documents_with_failed_media(...)   decode failures after packing: drop their documents from the loss

One step, on every rank of a pipeline stage (all of it on the host, before the model runs):
1. `StepBatches` takes the step's micro-batches (num_microbatches packed sequences) from the data stream;
2. each is planned (`batch.microbatch.plan_microbatch`); the first pipeline stage decodes only the frames
   stage 1 gives this rank; the CP ranks agree on decode failures (a host collective) and drop those documents;
3. the step's loss weight and learned-target count are summed over the micro-batches and all-reduced over
   DP x CP once (a host collective of two numbers) -- see "Fractional loss weights";
4. every planned micro-batch is moved to the model's device once; then Megatron's schedule runs
   `forward_step` on each, which only calls the model.

Fractional loss weights (per-sample weighting, a manifest's `loss_weight`) through Megatron's schedules: with
`calculate_per_token_loss` Megatron sums the loss of every micro-batch, sums the integer token counts the loss
function returns over micro-batches and DP x CP, and divides the gradients by that count N. Counting weights
instead would need fractional counts in megatron-core's int32 tensor. So the count stays the integer number of
learned targets, and each micro-batch's loss sum of weight x CE is multiplied by N / W, W being the step's total
weight over DP x CP: Megatron's division by N then gives exactly sum(weight x CE) / W, the weighted global
mean, and its logged loss (sum of reports / sum of counts) is the same mean. With unit weights N == W and the
factor is exactly 1. The price is one all-reduce of two numbers per step, on the host group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, List, Optional, Union

import torch
import torch.distributed as dist

from ..attention.megatron_core import uses_fp8_attention
from ..batch.microbatch import PlannedMicroBatch, plan_microbatch
from ..batch.sample import IGNORE_INDEX, MicroBatch
from ..data.dataset import decode_media
from ..data.errors import REASONS
from ..data.errors import advice as advice_for
from ..data.image_processor import SiglipImageProcessor
from ..errors import SkipThresholdExceeded, StepError
from ..parallel import comm
from ..parallel.state import get_mmsp_mesh
from ..planning.flops import Trains, sequence_flops
from ..planning.memory import ModelShape
from ..runtime.modules import model_device, unwrap_model

__all__ = ["StepConfig", "LongVILAStep", "StepBatches", "drop_documents_with_failed_media"]

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
    """PP > 1: the loss lives on the last stage, which does not decode; decode failures are counted only."""
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
    host_cp_group: Optional[object] = None
    """Host (gloo) process group of this rank's CP group, for decode-failure agreement; None: none needed (CP 1)."""
    max_skip_fraction: float = 1.0
    """Stop when more than this fraction of the samples read so far, over all data-parallel ranks, was skipped."""
    min_samples_for_skip_check: int = 20
    """Samples read (over all data-parallel ranks) before the skip fraction is judged."""


class StepBatches:
    """The data iterator a step's schedule reads: the step's micro-batches planned, decoded and on the device.

    Megatron's schedules take exactly `num_microbatches` items per step from the iterator they are given, on
    every rank of a pipeline stage; this iterator takes that many packed sequences from `source` at the first
    request of a step and prepares them together, so the step's weight totals are known before any loss.
    """

    def __init__(self, source: Iterator, step: "LongVILAStep", num_microbatches: Union[int, Callable[[], int]],
                 dataset=None):
        self.source = source
        self.step = step
        self.num_microbatches = num_microbatches
        self.dataset = dataset  # the VideoTextDataset behind the stream: its good / skipped counts
        self._ready: List[PlannedMicroBatch] = []
        self.consumed = 0  # packed sequences taken from the source

    def __iter__(self):
        return self

    def __next__(self) -> PlannedMicroBatch:
        if not self._ready:
            n = self.num_microbatches() if callable(self.num_microbatches) else int(self.num_microbatches)
            packed = [next(self.source) for _ in range(n)]
            self.consumed += n
            self._ready = self.step.prepare_step(packed, self.dataset)
        return self._ready.pop(0)

    def tokens(self) -> int:
        """Real tokens of the sequences this rank's step prepared so far."""
        return self.step.tokens_seen

    def flops(self) -> float:
        """Model FLOPs of those sequences (first pipeline stage; planning.flops), for TFLOP/s and MFU."""
        return self.step.flops_seen


class LongVILAStep:
    """Megatron's forward step for LongVILA (see the module docstring), for this rank's model (planning reads its
    vision config, media token, pipeline stage, MM-SP mesh and device)."""

    def __init__(self, config: StepConfig, model):
        self.config = config
        self.model = unwrap_model(model)
        self._processor = None
        self.blanked_media = 0
        """Media items blanked after failing to decode at training time (this rank's count)."""
        self.tokens_seen = 0
        """Real (non-filler) tokens of the micro-batches this rank prepared."""
        self.flops_seen = 0.0
        """Model training FLOPs of those micro-batches, counted on the first pipeline stage (planning.flops)."""
        self._flops_model = None

    # -- preparing ----------------------------------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            self._processor = SiglipImageProcessor(self.config.image_size, mode=self.config.image_mode,
                                                   mean=self.config.image_mean, std=self.config.image_std)
        return self._processor

    def batches(self, iterator: Iterator, num_microbatches: Union[int, Callable[[], int]], dataset=None
                ) -> StepBatches:
        return StepBatches(iterator, self, num_microbatches, dataset)

    def prepare(self, packed) -> PlannedMicroBatch:
        """One packed sequence -> this rank's planned micro-batch, frames decoded, on the model's device."""
        cfg = self.config
        m = self.model
        mesh = get_mmsp_mesh(m.config)
        size = (cfg.image_size, cfg.image_size)
        mb = MicroBatch.from_packed(packed, [None] * len(packed.media), [size] * len(packed.media))
        self.tokens_seen += mb.total_len
        self.flops_seen += self._sequence_flops(mb)
        planned = plan_microbatch(m.visual_spec, mb, mesh, uniform=cfg.uniform_shards,
                                  pad_to_multiple=cfg.pad_to_multiple,
                                  seq_length=cfg.seq_length if cfg.uniform_shards else None, pad_id=cfg.pad_id)
        if m.pre_process and mb.frames:
            failed = self._decode(packed, planned)
            if mesh.cp_size > 1:
                if cfg.host_cp_group is None:
                    raise StepError("StepConfig.host_cp_group is needed with context parallelism (decode failures "
                                    "are agreed on over the CP group)")
                comm.all_reduce(failed, cfg.host_cp_group, op=dist.ReduceOp.MAX, kind="decode_failures")
            if bool(failed.any()):
                self.blanked_media += int(failed.sum())
                if cfg.pipeline_parallel:
                    logger.warning("%d media item(s) failed to decode and were blanked (not dropped from the loss "
                                   "under pipeline parallelism)", int(failed.sum()))
                else:
                    drop_documents_with_failed_media(planned.batch, packed, failed)
                    # The weights changed: plan again (cheap, host only) so every derived figure agrees.
                    pixels = {f: planned.batch.frames[f].pixels for f in planned.frames_encoded}
                    planned = plan_microbatch(m.visual_spec, planned.batch, mesh, uniform=cfg.uniform_shards,
                                              pad_to_multiple=cfg.pad_to_multiple,
                                              seq_length=cfg.seq_length if cfg.uniform_shards else None,
                                              pad_id=cfg.pad_id)
                    for f, px in pixels.items():
                        planned.set_pixels(f, px)
        dtype = m.vision_model.conv1.weight.dtype if m.vision_model is not None else None
        # FP8 attention's padded-layout coordinates go to the device with the rest: no host copy inside the model.
        return planned.to(model_device(m), dtype, coords=uses_fp8_attention(getattr(m, "config", None)))

    def _sequence_flops(self, mb: MicroBatch) -> float:
        """The model FLOPs of one packed sequence from its own documents and frames (the first pipeline stage holds
        the encoder, so it counts; the loop counts one rank per replica)."""
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

    def _decode(self, packed, planned: PlannedMicroBatch) -> torch.Tensor:
        failed = torch.zeros(len(packed.media))
        mine = planned.frames_encoded
        if mine:
            decoded = decode_media(packed, mine, processor=self.processor, backend=self.config.decode_backend,
                                   on_error="blank")
            for g, px in zip(mine, decoded.pixels):
                planned.set_pixels(g, px)
            for media, _ in decoded.failed:
                failed[media] = 1
        return failed

    def prepare_step(self, packed_list, dataset=None) -> List[PlannedMicroBatch]:
        """Prepare a step's micro-batches and give each the step's loss scale (one host all-reduce)."""
        return self.finish_step([self.prepare(p) for p in packed_list], dataset)

    def finish_step(self, planned: List[PlannedMicroBatch], dataset=None) -> List[PlannedMicroBatch]:
        """Give a step's planned micro-batches the step's loss scale, learned targets / loss weight, both summed over
        the micro-batches and DP x CP, and judge the data's skip fraction over DP: one host all-reduce."""
        reasons = sorted(REASONS)
        skipped = dict(dataset.skipped) if dataset is not None else {}
        totals = torch.tensor([sum(p.local_weight for p in planned), float(sum(p.local_count for p in planned)),
                               float(dataset.ok if dataset is not None else 0)]
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
        if dataset is not None:
            # Every CP rank of a replica reads the same samples: counts over DP x CP are CP times the DP counts.
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
    logger.warning("dropped the documents of %d media item(s) that failed to decode from this micro-batch's loss",
                   int(failed.sum()))

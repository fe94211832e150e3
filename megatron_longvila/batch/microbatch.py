"""One planned micro-batch: everything a LongVILA step needs on this rank, computed once, on the device once.

`plan_microbatch(spec, batch, mesh)` turns a packed `MicroBatch` (host tensors, from the data pipeline) into a
`PlannedMicroBatch`: the sequence plan (which tokens this CP rank holds), the stage-1 frame assignment (which
frames it encodes), the stage-2 routing plan (where its embeddings go), this rank's shard of the token ids,
positions, shifted targets and loss weights, and every index tensor the forward and backward read. All of it
is computed on the host from metadata every CP rank has, so no collective is needed to plan. `.to(device)`
moves the tensors once (pinned and asynchronous on a CUDA build; the CPU build has no pinned memory), after
which the model's forward and backward look things up and never synchronize with the host.

Lifetime: the plan's caches (ring blocks, index tensors on the device) belong to the plan. Autograd nodes of
the micro-batch hold it until its backward has run (activation recompute re-runs the forward inside the
backward, with the same plan); once the step drops the PlannedMicroBatch they are freed with it. Nothing
is cached across micro-batches.

    VisualSpec                                 what planning needs to know of the encoder and the stage (a model's
                                               `visual_spec`): patch size, encoder width, media token, locality
    plan_microbatch(spec, batch, mesh, *, uniform=False, pad_to_multiple=1, seq_length=None, pad_id=0)
        -> PlannedMicroBatch
    fill_to(batch, seq_length, pad_id) -> MicroBatch       a filler document up to a fixed length (PP, SP)

Planning reads a description of the media's encoder, not the model: this layer lies below the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import LongVILAInputError
from ..parallel.mesh import MMSPMesh
from ..parallel.sharding import SequencePlan, plan_sequence
from ..plan.frames import FrameAssignment, assign_frames, encoder_cost, tokens_per_frame
from ..plan.routing import RoutingPlan, build_routing_plan
from ..runtime.device import host_to_device
from .sample import IGNORE_INDEX, MicroBatch, shift_targets

__all__ = ["VisualSpec", "PlannedMicroBatch", "plan_microbatch", "fill_to", "FrameGroup"]


@dataclass(frozen=True)
class VisualSpec:
    """What planning a micro-batch needs to know of the vision encoder and of this pipeline stage."""

    patch_size: int
    """The encoder's patch size in pixels (frame token counts and encoder costs)."""
    encoder_hidden: int
    """The encoder's width (the stage-1 cost estimate)."""
    media_token_id: Optional[int] = None
    """If given, every frame's token positions must hold this id (checked when planning)."""
    locality_aware: bool = True
    """Stage 1 prefers, among equally loaded choices, the rank that owns most of a frame's tokens."""
    encodes: bool = True
    """This pipeline stage encodes frames (the first stage; later stages plan tokens only)."""


@dataclass
class FrameGroup:
    """This rank's frames of one resolution: one encoder batch."""

    size: Tuple[int, int]
    """(H, W) in pixels."""
    frames: List[int]
    """Frame numbers of the micro-batch, in encoding order."""
    pixels: Optional[torch.Tensor] = None
    """[n, 3, H, W], filled from the decoded frames."""


@dataclass
class PlannedMicroBatch:
    """This rank's part of one micro-batch, planned (see the module docstring). Built by `plan_microbatch`."""

    batch: MicroBatch
    """The whole micro-batch (host), filler document included."""
    plan: SequencePlan
    """The LLM's sequence plan."""
    input_ids: torch.Tensor
    """[s_local] this rank's token ids (pads: pad_id)."""
    position_ids: torch.Tensor
    """[s_local] positions inside each document."""
    targets: torch.Tensor
    """[s_local] next-token targets (IGNORE_INDEX where nothing is learned, pads included)."""
    loss_weights: torch.Tensor
    """[s_local] weight of each local target."""
    total_weight: float
    """Sum of the loss weights of the whole micro-batch (all CP ranks), known on the host."""
    local_weight: float
    """Sum of this rank's loss weights."""
    local_count: int
    """This rank's learned targets (weight > 0): the integer count Megatron's per-token loss scaling sums."""
    assignment: Optional[FrameAssignment] = None
    """Stage 1 (first pipeline stage with frames)."""
    routing: Optional[RoutingPlan] = None
    """Stage 2 (first pipeline stage with frames)."""
    frames_encoded: List[int] = field(default_factory=list)
    """Frames this rank decodes and encodes, in frame order (the order of its routing buffer)."""
    groups: List[FrameGroup] = field(default_factory=list)
    """`frames_encoded` by resolution."""
    row_order: Optional[torch.Tensor] = None
    """Rows of the concatenated group outputs in frame order (None: already in frame order)."""
    step_scale: Optional[float] = None
    """Megatron's per-token loss scaling factor for fractional weights: (learned targets of the step) / (loss
    weight of the step), both over DP x CP and all micro-batches; set by the step before the schedule runs."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the tensors are."""
    count_tensor: Optional[torch.Tensor] = None
    """`local_count` as an int tensor on the device (the loss function's token count; made by `to`, so the loss
    function copies nothing from the host)."""

    def set_pixels(self, frame: int, pixels: torch.Tensor) -> None:
        """Give this rank's frame `frame` its decoded [3, H, W] pixels (host)."""
        self.batch.frames[frame].pixels = pixels

    def stage(self, dtype: Optional[torch.dtype] = None, pin: bool = False) -> "PlannedMicroBatch":
        """Gather each frame group's pixels into one host tensor (cast to `dtype`; pinned with `pin`), so that `to`
        only copies: a data producer does this off the training thread. Returns self."""
        for g in self.groups:
            missing = [f for f in g.frames if self.batch.frames[f].pixels is None]
            if missing:
                raise LongVILAInputError(
                    f"frames {missing} are assigned to this rank (stage 1) but their pixels are missing: decode the "
                    f"frames PlannedMicroBatch.frames_encoded names before staging it")
            px = torch.stack([self.batch.frames[f].pixels for f in g.frames])
            px = px.to(dtype) if dtype is not None else px
            g.pixels = px.pin_memory() if pin and not px.is_cuda else px
        return self

    def to(self, device, dtype: Optional[torch.dtype] = None, coords: bool = False) -> "PlannedMicroBatch":
        """Move every tensor the step reads to `device` (pinned, asynchronous where supported); returns self.

        dtype: cast the pixels to the encoder's parameter dtype on the way.
        coords: also the attention blocks' padded-layout coordinates (FP8 attention; SequencePlan.to).
        """
        device = torch.device(device)
        if any(g.pixels is None for g in self.groups):
            self.stage(dtype)
        for g in self.groups:
            g.pixels = host_to_device(g.pixels.to(dtype) if dtype is not None else g.pixels, device)
        for name in ("input_ids", "position_ids", "targets", "loss_weights"):
            setattr(self, name, host_to_device(getattr(self, name), device))
        if self.row_order is not None:
            self.row_order = host_to_device(self.row_order, device)
        self.count_tensor = host_to_device(torch.tensor(self.local_count, dtype=torch.int), device)
        self.plan.to(device, coords)
        if self.routing is not None:
            self.routing.to(device)
        self.device = device
        return self


def fill_to(batch: MicroBatch, seq_length: int, pad_id: int) -> MicroBatch:
    """`batch` plus a filler document (token pad_id, weight 0) up to seq_length tokens."""
    fill = seq_length - batch.total_len
    if fill < 0:
        raise LongVILAInputError(f"micro-batch of {batch.total_len} tokens is longer than seq_length {seq_length}")
    if fill == 0:
        return batch
    return MicroBatch(input_ids=torch.cat([batch.input_ids, batch.input_ids.new_full((fill,), pad_id)]),
                      labels=torch.cat([batch.labels, batch.labels.new_full((fill,), IGNORE_INDEX)]),
                      loss_weights=torch.cat([batch.loss_weights, batch.loss_weights.new_zeros(fill)]),
                      position_ids=torch.cat([batch.position_ids, torch.arange(fill)]),
                      seq_lens=list(batch.seq_lens) + [fill], frames=batch.frames,
                      sample_ids=list(batch.sample_ids))


def _check_frames(spec: VisualSpec, batch: MicroBatch) -> None:
    p = spec.patch_size
    for i, f in enumerate(batch.frames):
        expected = tokens_per_frame(f.height, f.width, p)
        if f.positions.numel() != expected:
            raise LongVILAInputError(f"frame {i} ({f.height}x{f.width} px) has {f.positions.numel()} token "
                                     f"positions, the encoder and projector produce {expected}")
        if spec.media_token_id is not None:
            bad = batch.input_ids[f.positions] != spec.media_token_id
            if bool(bad.any()):
                raise LongVILAInputError(f"frame {i}: input_ids at its token positions are not the media token "
                                         f"{spec.media_token_id} (e.g. position {int(f.positions[bad][0])})")


def _assign(spec: VisualSpec, batch: MicroBatch, plan: SequencePlan) -> FrameAssignment:
    """Stage 1 (the same on every CP rank): balance encoder cost; among equal choices prefer the rank that owns
    most of a frame's tokens (fewer rows cross the network in stage 2)."""
    costs = [encoder_cost(f.height, f.width, spec.patch_size, hidden=spec.encoder_hidden) for f in batch.frames]
    preferred = None
    if spec.locality_aware and plan.cp_size > 1 and batch.frames:
        owner_of = plan.owners()
        preferred = [int(torch.bincount(owner_of[f.positions], minlength=plan.cp_size).argmax())
                     for f in batch.frames]
    return assign_frames(costs, plan.cp_size, preferred=preferred)


def plan_microbatch(spec: VisualSpec, batch: MicroBatch, mesh: MMSPMesh, *, uniform: bool = False, pad_to_multiple: int = 1,
                    seq_length: Optional[int] = None, pad_id: int = 0) -> PlannedMicroBatch:
    """Plan one micro-batch for this rank (host only; see the module docstring).

    Args:
        spec: the encoder and stage this rank plans for (`LongVILAModel.visual_spec`).
        batch: the packed micro-batch (frames may lack pixels: only this rank's frames are decoded, afterwards).
        mesh: this rank's MM-SP mesh.
        uniform, pad_to_multiple: equal local lengths (PP > 1, TP sequence parallelism).
        seq_length: fixed shapes for Megatron's pipeline schedules: a filler document up to seq_length and a
            uniform plan, so every rank holds seq_length / CP tokens (seq_length must divide by CP, and by CP x TP
            under sequence parallelism).
        pad_id: token id of filler and pad tokens.
    """
    if not isinstance(spec, VisualSpec):
        raise TypeError(f"plan_microbatch takes a VisualSpec (a model's .visual_spec), not a {type(spec).__name__}")
    if sum(batch.seq_lens) != batch.total_len:
        raise LongVILAInputError(f"seq_lens add up to {sum(batch.seq_lens)}, the micro-batch has "
                                 f"{batch.total_len} tokens")
    if seq_length is not None:
        batch = fill_to(batch, int(seq_length), pad_id)
        uniform = True
    plan = plan_sequence(mesh, batch.seq_lens, uniform=uniform, pad_to_multiple=pad_to_multiple)
    if not uniform and min(plan.real_lens) == 0:
        # A sequence shorter than the mesh leaves some rank no token, and Megatron's layers cannot take an empty
        # sequence (their head reshapes are ambiguous at length 0): pad every rank to the same length instead.
        plan = plan_sequence(mesh, batch.seq_lens, uniform=True)
    if seq_length is not None and plan.local_len * plan.cp_size != seq_length:
        raise LongVILAInputError(
            f"seq_length {seq_length} over {plan.cp_size} CP ranks gives {plan.local_len} tokens per rank, not "
            f"seq_length / CP: make seq_length a multiple of CP (x TP under sequence parallelism)")
    targets, weights = shift_targets(batch.labels, batch.loss_weights, batch.seq_lens)
    local_ids = plan.shard(batch.input_ids)
    if plan.padded:
        local_ids[plan.token_index().numel():] = pad_id
    local_targets = plan.shard(targets)
    if plan.padded:  # pads learn nothing
        local_targets[plan.token_index().numel():] = IGNORE_INDEX
    local_w = plan.shard(weights)
    out = PlannedMicroBatch(
        batch=batch, plan=plan, input_ids=local_ids, position_ids=plan.shard(batch.position_ids),
        targets=local_targets, loss_weights=local_w, total_weight=float(weights.sum(dtype=torch.float64)),
        local_weight=float(local_w.sum(dtype=torch.float64)), local_count=int((local_w > 0).sum()))
    if spec.encodes and batch.frames:
        _check_frames(spec, batch)
        out.assignment = _assign(spec, batch, plan)
        out.frames_encoded = out.assignment.frames_of(mesh.cp_rank)
        out.routing = build_routing_plan(out.assignment.owner, [f.positions for f in batch.frames], plan)
        by_size: Dict[Tuple[int, int], FrameGroup] = {}
        for f in out.frames_encoded:
            slot = batch.frames[f]
            by_size.setdefault((slot.height, slot.width), FrameGroup(size=(slot.height, slot.width), frames=[])) \
                .frames.append(f)
        out.groups = list(by_size.values())
        encoding_order = [f for g in out.groups for f in g.frames]
        if encoding_order != out.frames_encoded:
            # Rows come out group by group; the routing buffer is in frame order.
            tpf = {f: int(batch.frames[f].positions.numel()) for f in encoding_order}
            start, offsets = 0, {}
            for f in encoding_order:
                offsets[f] = start
                start += tpf[f]
            out.row_order = torch.cat([torch.arange(offsets[f], offsets[f] + tpf[f]) for f in out.frames_encoded])
    return out

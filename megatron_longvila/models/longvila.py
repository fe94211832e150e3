"""The LongVILA model with two-stage MM-SP sharding.

One micro-batch is one packed sequence (several samples, `seq_lens`), laid over the CP group by the LLM's
sequence plan (`plan_sequence`: per-document zigzag over the ring, Ulysses pieces inside). On every CP rank:

1. stage 1: the micro-batch's frames and images are assigned to CP ranks by estimated encoder cost
   (`assign_frames`, identical on every rank); this rank encodes and projects only its own frames;
2. stage 2: the projected rows go straight to the ranks that own their token positions (`route`, one
   autograd-aware all-to-all); text embeddings are looked up locally for the local tokens;
3. the merged local embeddings enter the LLM as `decoder_input`;
4. the loss is an exact global token mean: targets are shifted on the whole sequence before sharding (no
   target is lost at a shard boundary), each rank returns sum(its weighted token losses) / (global weight),
   so the CP ranks' losses add up to the CP=1 loss and their gradients add up to its gradients.

The LLM is reached through a small adapter (`LanguageModelAdapter`): `embed` for local text embeddings
and `forward` from `decoder_input` to per-token losses under a sequence plan. `GPTAdapter` wraps the
project's Megatron GPT with MM-SP attention.

Inputs: `LongVILASample` (one sample: input_ids, labels, media with frames [n, 3, H, W] and the token
positions of each frame) and `MicroBatch` (packed samples), built by `MicroBatch.from_samples` or from the
data pipeline's `PackedSequence` with `MicroBatch.from_packed`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ..parallel.frame_assignment import FrameAssignment, assign_frames, encoder_cost
from ..parallel.mesh import MMSPMesh
from ..parallel.routing import RoutingPlan, build_routing_plan, merge_visual, route
from ..parallel.sharding import SequencePlan, plan_sequence
from .projector import MlpDownsampleProjector, tokens_per_frame
from .vision import SiglipVisionModel, patch_grid

IGNORE_INDEX = -100
"""Label of positions that carry no loss (as in the data pipeline and PyTorch's cross-entropy)."""


class LongVILAInputError(ValueError):
    """A micro-batch the model cannot take; the message says what is wrong."""


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

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
                   seq_lens=list(packed.seq_lens), frames=slots)

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
                      pixels=None if m.frames is None else m.frames[k]) for k in range(n)]


def _fill_to(batch: MicroBatch, seq_length: int, pad_id: int) -> MicroBatch:
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
                      seq_lens=list(batch.seq_lens) + [fill], frames=batch.frames)


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


# ----------------------------------------------------------------------------------------------------
# The LLM side
# ----------------------------------------------------------------------------------------------------

class LanguageModelAdapter(torch.nn.Module):
    """What LongVILA needs from an LLM. Subclasses wrap a concrete model as `self.model`."""

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Local token ids [s_local] -> embeddings [s_local, 1, hidden] (Megatron layout)."""
        raise NotImplementedError

    def forward(self, decoder_input: Optional[torch.Tensor], position_ids: torch.Tensor, targets: torch.Tensor,
                plan: SequencePlan) -> torch.Tensor:
        """Local embeddings [s_local, 1, hidden] -> per-token cross-entropy [s_local] for `targets` (entries with
        IGNORE_INDEX may hold any value). With pipeline parallelism, non-first stages get None and read their
        input from `set_input_tensor`; non-last stages return hidden states instead."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def set_input_tensor(self, input_tensor) -> None:
        self.model.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The wrapped LLM's own sharded state dict under `<prefix>model.`.

        A plain torch module would be checkpointed by Megatron's default as replicated tensors, losing the LLM's
        TP sharding and pipeline layer offsets; the wrapped Megatron model knows both.
        """
        return self.model.sharded_state_dict(prefix=f"{prefix}model.", sharded_offsets=sharded_offsets,
                                             metadata=metadata)


class GPTAdapter(LanguageModelAdapter):
    """A Megatron GPTModel with MM-SP attention (`models.gpt.build_gpt_model`) as LongVILA's LLM.

    The plan reaches MM-SP attention as `MMSPPackedSeqParams`. Under TP sequence parallelism the text
    embeddings are looked up unscattered (the visual rows must be merged first) and scattered over TP after
    the merge, as Megatron's LLaVA does.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        emb = getattr(model, "embedding", None)
        if emb is not None:
            # The visual rows are merged into the whole local sequence before the SP scatter, so the lookup must
            # return every local token. Clearing scatter_to_sequence_parallel alone is not enough: under SP the
            # embedding decided at construction to reduce-scatter inside VocabParallelEmbedding
            # (reduce_scatter_embeddings), which would hand back 1/TP of the tokens.
            emb.scatter_to_sequence_parallel = False
            emb.reduce_scatter_embeddings = False
            emb.word_embeddings.reduce_scatter_embeddings = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0))

    def forward(self, decoder_input, position_ids, targets, plan):
        from megatron.core import tensor_parallel

        from ..attention.megatron_core import MMSPPackedSeqParams

        if decoder_input is not None and self.model.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        longest = max(plan.seq_lens)
        params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, max_seqlen_q=longest, max_seqlen_kv=longest)
        labels = targets.clamp(min=0).unsqueeze(0) if self.model.post_process else None
        out = self.model(input_ids=None, position_ids=position_ids.unsqueeze(0), attention_mask=None,
                         decoder_input=decoder_input, labels=labels, packed_seq_params=params)
        return out[0] if self.model.post_process else out


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

@dataclass
class StepInfo:
    """What one forward did, for tests and benchmarks."""

    plan: SequencePlan
    assignment: FrameAssignment
    routing: Optional[RoutingPlan]
    frames_encoded: List[int]


class LongVILAModel(MegatronModule):
    """Vision encoder + mlp_downsample projector + LLM, with MM-SP frame and token sharding.

    Args:
        vision_model: the encoder (None on pipeline stages other than the first).
        projector: the projector (None with the encoder).
        language_model: a `LanguageModelAdapter`.
        media_token_id: if given, every frame's token positions must hold this id (checked every step).
        locality_aware: let stage 1 prefer, among equally loaded choices, the rank that owns most of a frame's
            tokens (fewer rows cross the network in stage 2; the encoder balance is unchanged).
        pre_process / post_process: first / last pipeline stage (Megatron's meaning).
    """

    def __init__(self, vision_model: Optional[SiglipVisionModel], projector: Optional[MlpDownsampleProjector],
                 language_model: LanguageModelAdapter, *, media_token_id: Optional[int] = None,
                 locality_aware: bool = True, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=language_model.model.config if hasattr(language_model, "model") else None)
        if pre_process and (vision_model is None or projector is None):
            raise LongVILAInputError("the first pipeline stage needs the vision encoder and the projector")
        self.vision_model = vision_model if pre_process else None
        self.projector = projector if pre_process else None
        self.language_model = language_model
        self.media_token_id = media_token_id
        self.locality_aware = locality_aware
        self.pre_process, self.post_process = pre_process, post_process
        # Megatron's schedules read model_type; the encoder lives inside the first stage (one pipeline of
        # decoder-like stages, as LLaVA in megatron-core), not on stages of its own.
        self.model_type = ModelType.encoder_or_decoder
        self.last_step: Optional[StepInfo] = None

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron's sharded state dict (for megatron.core.dist_checkpointing): each part with its own sharding.

        Keys: `vision_model.*` and `projector.*` (first pipeline stage only) and `language_model.model.*` (the
        LLM's, with its TP sharding and global layer numbers), so a checkpoint reshards across TP and PP.
        """
        if sharded_offsets:
            raise ValueError("LongVILAModel is a whole pipeline stage: its parts take no outer sharded_offsets")
        sd = {}
        for name in ("vision_model", "projector", "language_model"):
            part = getattr(self, name)
            if part is not None:
                sd.update(part.sharded_state_dict(prefix=f"{prefix}{name}.", metadata=metadata))
        return sd

    # Megatron's finalize_model_grads asks the first and last pipeline stages' model for these (to all-reduce a
    # tied embedding/output weight); without them a PP > 1 step fails after the backward.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return bool(getattr(self.language_model.model, "share_embeddings_and_output_weights", False))

    def shared_embedding_or_output_weight(self):
        return self.language_model.model.shared_embedding_or_output_weight()

    # -- stage 1 ---------------------------------------------------------------------------------------
    def frame_costs(self, frames: Sequence[FrameSlot]) -> List[float]:
        cfg = self.vision_model.cfg
        return [encoder_cost(f.height, f.width, cfg.patch_size, hidden=cfg.hidden_size) for f in frames]

    def assign(self, batch: MicroBatch, plan: SequencePlan) -> FrameAssignment:
        """Stage 1 for this micro-batch (the same on every CP rank)."""
        preferred = None
        if self.locality_aware and plan.cp_size > 1 and batch.frames:
            owner_of = torch.empty(plan.total_len, dtype=torch.long)
            for r in range(plan.cp_size):
                owner_of[plan.token_index(r)] = r
            preferred = [int(torch.bincount(owner_of[f.positions], minlength=plan.cp_size).argmax())
                         for f in batch.frames]
        return assign_frames(self.frame_costs(batch.frames), plan.cp_size, preferred=preferred)

    def _check_frames(self, batch: MicroBatch) -> None:
        p = self.vision_model.cfg.patch_size
        for i, f in enumerate(batch.frames):
            expected = tokens_per_frame(f.height, f.width, p)
            if f.positions.numel() != expected:
                raise LongVILAInputError(f"frame {i} ({f.height}x{f.width} px) has {f.positions.numel()} token "
                                         f"positions, the encoder and projector produce {expected}")
            if self.media_token_id is not None:
                bad = batch.input_ids[f.positions] != self.media_token_id
                if bool(bad.any()):
                    raise LongVILAInputError(f"frame {i}: input_ids at its token positions are not the media token "
                                             f"{self.media_token_id} (e.g. position {int(f.positions[bad][0])})")

    def _visual_trains(self) -> Tuple[bool, bool]:
        enc = any(p.requires_grad for p in self.vision_model.parameters())
        proj = any(p.requires_grad for p in self.projector.parameters())
        return enc, proj

    def encode_local(self, batch: MicroBatch, frame_ids: Sequence[int]) -> torch.Tensor:
        """Encode and project this rank's frames; rows in frame order: [sum of their tokens, llm hidden]."""
        enc_trains, proj_trains = self._visual_trains()
        needs_grad = torch.is_grad_enabled() and (enc_trains or proj_trains)
        hidden = self.language_model.hidden_size
        dtype = self.projector.layernorm.weight.dtype if hasattr(self.projector.layernorm, "weight") else None
        if not frame_ids:
            # Zero rows, but part of the graph: this rank must still run the backward all-to-all.
            return torch.zeros(0, hidden, dtype=dtype, requires_grad=needs_grad)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for f in frame_ids:
            slot = batch.frames[f]
            if slot.pixels is None:
                raise LongVILAInputError(f"frame {f} is assigned to this rank (stage 1) but its pixels are missing: "
                                         f"decode the frames `LongVILAModel.assign` gives this rank")
            groups.setdefault((slot.height, slot.width), []).append(f)
        rows: Dict[int, torch.Tensor] = {}
        p = self.vision_model.cfg.patch_size
        for (h, w), fs in groups.items():
            pixels = torch.stack([batch.frames[f].pixels for f in fs])
            with torch.set_grad_enabled(needs_grad and enc_trains):
                feats = self.vision_model(pixels)
            with torch.set_grad_enabled(needs_grad):
                out = self.projector(feats, *patch_grid(h, w, p))
            for k, f in enumerate(fs):
                rows[f] = out[k]
        return torch.cat([rows[f] for f in frame_ids])

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, batch: MicroBatch, mesh: MMSPMesh, *, uniform: bool = False, pad_to_multiple: int = 1,
                reduction: str = "global_mean", seq_length: Optional[int] = None, pad_id: int = 0):
        """One micro-batch on one CP rank.

        seq_length: fixed shapes for Megatron's pipeline schedules (PP > 1) and TP sequence parallelism: the
        micro-batch gets a filler document (token `pad_id`, no loss) up to seq_length and a uniform plan, so every
        rank holds exactly seq_length / CP tokens, the shape Megatron's schedules allocate (seq_length must divide
        by CP, and by CP x TP under sequence parallelism). Losses and gradients are those of the unfilled batch.

        Returns (last pipeline stage), with reduction="global_mean", this rank's share of the loss: sum over its
        tokens of weight * CE, divided by the micro-batch's total weight; the CP ranks' shares add up to the full
        loss. With reduction="none": (per-token CE [1, s_local], loss weights [1, s_local]), e.g. for
        `training.loss.loss_func` under Megatron's schedules with calculate_per_token_loss. Other pipeline
        stages return the LLM's hidden states.
        """
        if reduction not in ("global_mean", "none"):
            raise LongVILAInputError(f"reduction must be 'global_mean' or 'none', got {reduction!r}")
        if sum(batch.seq_lens) != batch.total_len:
            raise LongVILAInputError(f"seq_lens add up to {sum(batch.seq_lens)}, the micro-batch has "
                                     f"{batch.total_len} tokens")
        if seq_length is not None:
            batch = _fill_to(batch, int(seq_length), pad_id)
            uniform = True
        plan = plan_sequence(mesh, batch.seq_lens, uniform=uniform, pad_to_multiple=pad_to_multiple)
        if seq_length is not None and plan.local_len * plan.cp_size != seq_length:
            raise LongVILAInputError(
                f"seq_length {seq_length} over {plan.cp_size} CP ranks gives {plan.local_len} tokens per rank, not "
                f"seq_length / CP: make seq_length a multiple of CP (x TP under sequence parallelism)")
        targets, weights = shift_targets(batch.labels, batch.loss_weights, batch.seq_lens)
        local_ids = plan.shard(batch.input_ids)
        local_pos = plan.shard(batch.position_ids)
        local_targets = plan.shard(targets)
        if plan.padded:  # pads learn nothing
            local_targets[plan.token_index().numel():] = IGNORE_INDEX
        local_w = plan.shard(weights)

        decoder_input = None
        assignment, rplan, mine = None, None, []
        if self.pre_process:
            self._check_frames(batch)
            decoder_input = self.language_model.embed(local_ids, local_pos)
            assignment = self.assign(batch, plan)
            if batch.frames:
                mine = assignment.frames_of(mesh.cp_rank)
                local_rows = self.encode_local(batch, mine)
                rplan = build_routing_plan(assignment.owner, [f.positions for f in batch.frames], plan)
                received = route(local_rows, rplan, mesh.cp_group)
                decoder_input = merge_visual(decoder_input, received, rplan)
        self.last_step = StepInfo(plan=plan, assignment=assignment, routing=rplan, frames_encoded=mine)

        out = self.language_model(decoder_input, local_pos, local_targets, plan)
        if not self.post_process:
            return out
        if reduction == "none":
            return out.unsqueeze(0), local_w.to(out.dtype).unsqueeze(0)
        total_w = weights.sum()
        if float(total_w) == 0:
            return (out * 0).sum()  # nothing to learn; keep the graph (and its collectives) intact
        return (out * local_w.to(out.dtype)).sum() / total_w.to(out.dtype)

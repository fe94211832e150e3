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

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ..parallel.mesh import MMSPMesh
from ..parallel.routing import merge_visual, route
from ..parallel.sharding import SequencePlan
from .projector import MlpDownsampleProjector
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
        self.record = None  # the models.record.ModelRecord it was built from, when built from one (checkpoints)

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

    def _visual_trains(self) -> Tuple[bool, bool]:
        enc = any(p.requires_grad for p in self.vision_model.parameters())
        proj = any(p.requires_grad for p in self.projector.parameters())
        return enc, proj

    def encode_local(self, mb) -> torch.Tensor:
        """Encode and project this rank's frames of a PlannedMicroBatch: [sum of their tokens, llm hidden], rows in
        frame order (the order of the routing buffer)."""
        enc_trains, proj_trains = self._visual_trains()
        needs_grad = torch.is_grad_enabled() and (enc_trains or proj_trains)
        hidden = self.language_model.hidden_size
        dtype = self.projector.layernorm.weight.dtype if hasattr(self.projector.layernorm, "weight") else None
        if not mb.groups:
            # Zero rows, but part of the graph: this rank must still run the backward all-to-all.
            return torch.zeros(0, hidden, dtype=dtype, device=mb.device, requires_grad=needs_grad)
        p = self.vision_model.cfg.patch_size
        outs = []
        for g in mb.groups:
            with torch.set_grad_enabled(needs_grad and enc_trains):
                feats = self.vision_model(g.pixels)
            with torch.set_grad_enabled(needs_grad):
                out = self.projector(feats, *patch_grid(g.size[0], g.size[1], p))
            outs.append(out.reshape(-1, out.shape[-1]))
        rows = outs[0] if len(outs) == 1 else torch.cat(outs)
        return rows if mb.row_order is None else rows.index_select(0, mb.row_order)

    def embed_inputs(self, mb) -> torch.Tensor:
        """The LLM's input for this rank's tokens of a PlannedMicroBatch: text embeddings, with the visual rows of its
        tokens (stage 1 on this rank's frames, stage 2 to their owners) in place: [s_local, 1, hidden]."""
        decoder_input = self.language_model.embed(mb.input_ids, mb.position_ids)
        if mb.routing is not None:
            local_rows = self.encode_local(mb)
            received = route(local_rows, mb.routing, mb.plan.mesh.cp_group)
            decoder_input = merge_visual(decoder_input, received, mb.routing)
        return decoder_input

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, batch, mesh: Optional[MMSPMesh] = None, *, uniform: bool = False, pad_to_multiple: int = 1,
                reduction: str = "global_mean", seq_length: Optional[int] = None, pad_id: int = 0):
        """One micro-batch on one CP rank.

        batch: a `training.microbatch.PlannedMicroBatch` (the training step plans and moves it before the
            schedule runs; nothing is planned or copied to the device here), or a `MicroBatch`, which is planned
            for `mesh` with the other arguments and moved to the model's device first (convenience for tests,
            tools and inference; its frames must carry the pixels of this rank's frames).
        seq_length: fixed shapes for Megatron's pipeline schedules (PP > 1) and TP sequence parallelism (see
            `plan_microbatch`). Losses and gradients are those of the unfilled batch.

        Returns (last pipeline stage), with reduction="global_mean", this rank's share of the loss: sum over its
        tokens of weight * CE, divided by the micro-batch's total weight; the CP ranks' shares add up to the full
        loss. With reduction="none": (per-token CE [1, s_local], loss weights [1, s_local]), e.g. for
        `training.step` under Megatron's schedules with calculate_per_token_loss. Other pipeline stages return the
        LLM's hidden states.
        """
        from ..training.microbatch import PlannedMicroBatch, model_device, plan_microbatch

        if reduction not in ("global_mean", "none"):
            raise LongVILAInputError(f"reduction must be 'global_mean' or 'none', got {reduction!r}")
        if isinstance(batch, PlannedMicroBatch):
            mb = batch
        else:
            if mesh is None:
                raise LongVILAInputError("LongVILAModel.forward(MicroBatch, mesh): give the MM-SP mesh to plan with")
            dtype = self.vision_model.conv1.weight.dtype if self.vision_model is not None else None
            mb = plan_microbatch(self, batch, mesh, uniform=uniform, pad_to_multiple=pad_to_multiple,
                                 seq_length=seq_length, pad_id=pad_id).to(model_device(self), dtype)
        plan = mb.plan
        decoder_input = self.embed_inputs(mb) if self.pre_process else None
        out = self.language_model(decoder_input, mb.position_ids, mb.targets, plan)
        if not self.post_process:
            return out
        if reduction == "none":
            return out.unsqueeze(0), mb.loss_weights.to(out.dtype).unsqueeze(0)
        if mb.total_weight == 0:
            return (out * 0).sum()  # nothing to learn; keep the graph (and its collectives) intact
        return (out * mb.loss_weights.to(out.dtype)).sum() / mb.total_weight

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

from typing import Optional, Tuple

import torch

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ..batch.microbatch import PlannedMicroBatch, VisualSpec, plan_microbatch
from ..batch.packed_seq_params import MMSPPackedSeqParams
# The sample types' documented home is this module: they are defined in the batch layer and re-exported here.
from ..batch.sample import IGNORE_INDEX, FrameSlot, LongVILASample, Media, MicroBatch, shift_targets
from ..errors import LongVILAInputError
from ..parallel.mesh import MMSPMesh
from ..parallel.routing import merge_visual, route
from ..parallel.sharding import SequencePlan
from ..plan.frames import patch_grid
from ..runtime.modules import model_device
from .projector import MlpDownsampleProjector
from .vision import SiglipVisionModel

__all__ = ["LongVILAModel", "LanguageModelAdapter", "GPTAdapter", "LongVILASample", "Media", "MicroBatch",
           "FrameSlot", "IGNORE_INDEX", "LongVILAInputError", "shift_targets"]


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

    @property
    def visual_spec(self) -> VisualSpec:
        """What planning a micro-batch needs of this model (batch.microbatch.plan_microbatch): the encoder's patch
        size and width, the media token, the stage-1 preference and whether this pipeline stage encodes."""
        cfg = self.vision_model.cfg if self.vision_model is not None else None
        return VisualSpec(patch_size=cfg.patch_size if cfg else 1, encoder_hidden=cfg.hidden_size if cfg else 1,
                          media_token_id=self.media_token_id, locality_aware=self.locality_aware,
                          encodes=self.pre_process)

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
            # Zero rows, but part of the graph: this rank must still run the backward all-to-all, and every trainable
            # encoder and projector parameter must take part in the backward (see _unused_visual_parameters).
            rows = torch.zeros(0, hidden, dtype=dtype, device=mb.device, requires_grad=needs_grad)
            return rows + self._unused_visual_parameters(dtype) if needs_grad else rows
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
        elif torch.is_grad_enabled() and any(self._visual_trains()):
            # A micro-batch without media (text only) skips the encoder on every rank.
            decoder_input = decoder_input + self._unused_visual_parameters(decoder_input.dtype)
        return decoder_input

    def _unused_visual_parameters(self, dtype) -> torch.Tensor:
        """0 x (the sum of every trainable encoder and projector parameter): a scalar that adds nothing but puts each
        of them in this backward with a zero gradient. Megatron's DDP with --overlap-grad-reduce reduces a gradient
        bucket once every parameter in it reported its gradient; a rank whose micro-batch gives its encoder nothing
        to do (no frame stage 1 assigns it, or a text-only micro-batch) would otherwise never complete the encoder's
        buckets, and its data-parallel peers would wait for it."""
        params = [p for part in (self.vision_model, self.projector) for p in part.parameters() if p.requires_grad]
        total = torch.stack([p.sum().to(torch.float32) for p in params]).sum()
        return (total * 0.0).to(dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, batch, mesh: Optional[MMSPMesh] = None, *, uniform: bool = False, pad_to_multiple: int = 1,
                reduction: str = "global_mean", seq_length: Optional[int] = None, pad_id: int = 0):
        """One micro-batch on one CP rank.

        batch: a `batch.microbatch.PlannedMicroBatch` (the training step plans and moves it before the
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
        if reduction not in ("global_mean", "none"):
            raise LongVILAInputError(f"reduction must be 'global_mean' or 'none', got {reduction!r}")
        if isinstance(batch, PlannedMicroBatch):
            mb = batch
        else:
            if mesh is None:
                raise LongVILAInputError("LongVILAModel.forward(MicroBatch, mesh): give the MM-SP mesh to plan with")
            dtype = self.vision_model.conv1.weight.dtype if self.vision_model is not None else None
            mb = plan_microbatch(self.visual_spec, batch, mesh, uniform=uniform, pad_to_multiple=pad_to_multiple,
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

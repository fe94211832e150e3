"""MM-SP attention inside Megatron-Core's GPT layer: the core-attention module and its plumbing.

The mesh and settings a model's layers use are attached to its TransformerConfig by
`parallel.state.initialize_mmsp`; the micro-batch's plan reaches the layers in `batch.packed_seq_params.
MMSPPackedSeqParams`.

Public API:
    plan_for(packed_seq_params, local_len, config=None) -> SequencePlan   the plan a forward pass uses
    MMSPCoreAttention                      Megatron core_attention (sbhd and thd) on top of mmsp_attention
    MMSPSelfAttention(SelfAttention)       applies RoPE at the plan's per-document positions
    mark_plan_rope_table(t) -> t           flag a rotary table as un-sliced (see models.gpt.PlanRotaryEmbedding)

Why a SelfAttention subclass: Megatron applies RoPE before core attention, slicing positions in its own CP
layout (or, for thd, splitting each document in 2*CP chunks). The MM-SP plan uses a different layout, so
MMSPSelfAttention takes the full rotary table, picks the rows of this rank's tokens (plan.position_ids),
and hands Megatron's attention the result as an ordinary sbhd sequence. thd and sbhd then differ only in
the core-attention tensor shapes, which MMSPCoreAttention handles.

No host synchronization happens in these modules when the plan was put on the device first (`plan.to`, which
the training step's planned micro-batch does): positions, the longest document and every index are known on
the host or already on the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.multiprocessing.reductions import StorageWeakRef

from ..batch.packed_seq_params import MMSPPackedSeqParams
from ..errors import MMSPConfigError, MMSPRuntimeError
from ..parallel.mesh import single_rank_mesh
from ..parallel.sharding import SequencePlan, plan_sequence
from ..parallel.state import mmsp_state
from .mmsp import mmsp_attention

__all__ = ["plan_for", "MMSPCoreAttention", "MMSPSelfAttention", "mark_plan_rope_table", "is_plan_rope_table",
           "MMSPRuntimeError", "uses_fp8_attention"]


_PLAN_ATTR = "_mmsp_plan"


def uses_fp8_attention(config) -> bool:
    """The ring's blocks run Transformer Engine's FP8 kernel: FP8 training with --fp8-dot-product-attention, or the
    MM-SP settings' te_fp8 kernel (their device offsets then include the padded-layout coordinates)."""
    if getattr(config, "fp8", None) and getattr(config, "fp8_dot_product_attention", False):
        return True
    state = mmsp_state(config) if config is not None else None
    return state is not None and state.config.attention_backend == "te_fp8"


def plan_for(packed_seq_params: Optional[PackedSeqParams], local_len: int, config=None) -> SequencePlan:
    """The sharding plan of the current micro-batch.

    An MMSPPackedSeqParams carries it. A plain thd PackedSeqParams (Megatron's own data path) gets a plan from
    its global, unpadded cu_seqlens_q with the shard settings `initialize_mmsp` attached to `config`; the plan is
    kept on the params object, so the first layer builds it and the others reuse it (reading cu_seqlens from a
    GPU tensor is then one host synchronization per micro-batch, in that first layer). With no params at all the
    sequence is one document, which is only unambiguous without context parallelism.
    """
    plan = getattr(packed_seq_params, "plan", None) or getattr(packed_seq_params, _PLAN_ATTR, None)
    if plan is None:
        state = mmsp_state(config)
        mesh = state.mesh if state is not None else single_rank_mesh()
        cfg = state.config if state is not None else None
        uniform = bool(cfg.uniform_shards) if cfg else False
        multiple = cfg.pad_to_multiple if cfg else 1
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu = [int(x) for x in packed_seq_params.cu_seqlens_q.tolist()]
            seq_lens = tuple(b - a for a, b in zip(cu, cu[1:]) if b > a)
        elif mesh.cp_size == 1:
            seq_lens = (local_len,)
        else:
            raise MMSPRuntimeError(
                "MM-SP attention with context parallelism needs the micro-batch's sharding plan: build the batch "
                "with megatron_longvila.batch.gpt.shard_batch and pass its packed_seq_params to the model")
        plan = plan_sequence(mesh, seq_lens, uniform=uniform, pad_to_multiple=multiple if uniform else 1)
        if packed_seq_params is not None:
            setattr(packed_seq_params, _PLAN_ATTR, plan)
    if plan.local_len != local_len:
        raise MMSPRuntimeError(
            f"this rank holds {local_len} tokens but the sharding plan gives it {plan.local_len} (documents "
            f"{plan.seq_lens}): shard tokens, labels and position ids with batch.gpt.shard_batch (not "
            f"Megatron's get_batch_on_this_cp_rank)")
    return plan


_PLAN_ROPE_FLAG = "_mmsp_full_rope_table"


_PLAN_ROPE_STORAGES: dict = {}


def mark_plan_rope_table(table: torch.Tensor) -> torch.Tensor:
    """Flag a rotary table as covering positions 0..n-1 un-sliced (what MMSPSelfAttention indexes by plan)."""
    setattr(table, _PLAN_ROPE_FLAG, True)
    # Full activation recompute hands each layer a detach()ed copy of its checkpoint inputs: same storage, but
    # without Python attributes. The storage (weakly held) identifies the table there too.
    for ptr in [p for p, ref in _PLAN_ROPE_STORAGES.items() if ref.expired()]:
        del _PLAN_ROPE_STORAGES[ptr]
    _PLAN_ROPE_STORAGES[table.untyped_storage().data_ptr()] = StorageWeakRef(table.untyped_storage())
    return table


def is_plan_rope_table(table: torch.Tensor) -> bool:
    """Whether `table` is (a detached alias of) a table flagged by mark_plan_rope_table."""
    if getattr(table, _PLAN_ROPE_FLAG, False):
        return True
    ref = _PLAN_ROPE_STORAGES.get(table.untyped_storage().data_ptr())
    return ref is not None and not ref.expired()


class MMSPSelfAttention(SelfAttention):
    """Megatron's SelfAttention with RoPE taken at the plan's per-document positions (see module docstring)."""

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        if inference_context is not None or inference_params is not None:
            raise MMSPRuntimeError("MM-SP layers run inference with megatron_longvila.inference (sharded KV cache), "
                                   "not Megatron's inference contexts")
        state = getattr(packed_seq_params, "inference", None)
        if state is not None and state.mode == "decode":
            # The inference state brings its own decode step (one replicated token against the sharded KV cache).
            return state.decode_self_attention(self, hidden_states, rotary_pos_emb)
        if rotary_pos_cos is not None or rotary_pos_sin is not None or rotary_pos_cos_sin is not None:
            raise MMSPRuntimeError("MM-SP layers take RoPE as a rotary table (rotary_pos_emb), not cos/sin")
        local_len = hidden_states.shape[0]
        if self.config.sequence_parallel:
            local_len *= self.config.tensor_model_parallel_size
        plan = plan_for(packed_seq_params, local_len, self.config)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd" and hidden_states.shape[1] != 1:
            raise MMSPRuntimeError(f"thd format needs batch 1, got hidden states {tuple(hidden_states.shape)}")
        # From here on every layout is sbhd to Megatron (thd is sbhd with b == 1); the plan knows the documents.
        params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, inference=state)
        if rotary_pos_emb is not None:
            tables = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
            local = []
            for table in tables:
                if table is None:
                    local.append(None)
                    continue
                if plan.cp_size > 1 and not is_plan_rope_table(table):
                    raise MMSPRuntimeError(
                        "the model's RotaryEmbedding slices positions in Megatron's CP layout, which is not the MM-SP "
                        "layout: build the model with megatron_longvila.models.gpt.build_gpt_model, or call "
                        "megatron_longvila.models.gpt.use_plan_rope(model) after building it")
                # The longest document is known on the host: no look at the position tensor itself.
                if plan.max_doc_len > table.shape[0]:
                    raise MMSPRuntimeError(
                        f"a document of {plan.max_doc_len} tokens exceeds the rotary table ({table.shape[0]} "
                        f"positions): raise --max-position-embeddings / --seq-length")
                local.append(table.index_select(0, plan.local_position_ids(table.device)))
            rotary_pos_emb = tuple(local)
        return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                               rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                               packed_seq_params=params, sequence_len_offset=sequence_len_offset)


class MMSPCoreAttention(MegatronModule):
    """Megatron-Core core_attention on MM-SP's 2D (Ulysses x zigzag ring) attention.

    Inputs are this rank's tokens as sharded by the micro-batch's plan, after TP has split the heads:
    sbhd q [s, b, heads_q/TP, d] and k, v [s, b, heads_kv/TP (or 1), d], or thd [t, heads, d]. Documents of
    the plan never attend to each other; inside a document attention is causal (or full for no_mask). The
    Ulysses all-to-all then splits the heads TP left over the U ranks of the mesh.

    `attention_mask` must be None: masking is defined by the plan's documents and the mask type (Megatron's
    dense [b, 1, s, s] masks describe the unsharded sequence and cannot be honoured here).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, backend: Optional[str] = None):
        super().__init__(config=config)
        if attention_type != "self":
            raise MMSPConfigError(f"MM-SP core attention implements self-attention only, got {attention_type!r}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise MMSPConfigError(f"attention dropout {dropout}: MM-SP attention has no dropout; set "
                                  f"--attention-dropout 0")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise MMSPConfigError(f"attention mask type {attn_mask_type.name}: MM-SP attention is causal (or "
                                  f"unmasked) inside each document of the plan; use attn_mask_type=causal")
        if cp_comm_type not in (None, "a2a+p2p") and config.context_parallel_size > 1:
            raise MMSPConfigError(f"--cp-comm-type {cp_comm_type}: MM-SP is hierarchical; set --cp-comm-type a2a+p2p")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise MMSPConfigError("--apply-query-key-layer-scaling is not supported by MM-SP attention")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self._backend = backend  # from the layer spec; None: the MM-SP settings' kernel, read at forward time

    @property
    def backend(self) -> str:
        """The local kernel: FP8 when configured, else the spec's choice, else what initialize_mmsp validated.

        Read at forward time, so a model built before initialize_mmsp still runs the kernel it configures."""
        if uses_fp8_attention(self.config):
            return "te_fp8"  # validated at start-up: TE imports and no other kernel was asked for
        if self._backend is not None:
            return self._backend
        state = mmsp_state(self.config)
        return state.config.attention_backend if state is not None else "auto"

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None:
            raise MMSPRuntimeError("MM-SP attention takes attention_mask=None (documents and causality come from the "
                                   "sharding plan); build batches without a dense mask "
                                   "(--no-create-attention-mask-in-dataloader)")
        if attention_bias is not None:
            raise MMSPRuntimeError("MM-SP attention does not take an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise MMSPRuntimeError(f"attention mask type {mask_type.name} is not supported by MM-SP attention")
        thd = query.dim() == 3
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        plan = plan_for(packed_seq_params, query.shape[0], self.config)
        state = getattr(packed_seq_params, "inference", None)
        if state is not None:  # prefill: this rank's own tokens' K/V (RoPE applied), before the Ulysses all-to-all
            state.cache.store_prefill(self.layer_number, key, value, plan)
        out = mmsp_attention(query, key, value, plan, causal=mask_type == AttnMaskType.causal,
                             softmax_scale=self.softmax_scale, backend=self.backend)
        s, b = out.shape[0], out.shape[1]
        return out.reshape(s, -1) if thd else out.reshape(s, b, -1)

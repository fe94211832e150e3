"""Build a Megatron-Core GPTModel that runs MM-SP context parallelism.

Public API:
    build_gpt_model(config, *, vocab_size, max_sequence_length, spec=None, pre_process=None, post_process=None,
                    share_embeddings_and_output_weights=False, rotary_base=10000, rotary_percent=1.0,
                    vp_stage=None, cp_attention="mmsp") -> GPTModel
        validates the layer spec against the config, builds a RoPE GPTModel with the MM-SP spec (default
        `get_gpt_mmsp_layer_spec()`), and installs PlanRotaryEmbedding.
    PlanRotaryEmbedding(RotaryEmbedding)   rotary table over positions 0..max_sequence_length-1, never sliced
        in Megatron's CP layout (MMSPSelfAttention indexes it by the plan's per-document positions)
    use_plan_rope(model) -> model          swap a built GPTModel's RotaryEmbedding for PlanRotaryEmbedding
        (for a model_provider that builds GPTModel itself, e.g. Megatron's pretrain_gpt.py with --spec)
    mask_padded_vocab(model, vocab_size) -> model   logits of padding rows (Megatron pads the vocabulary to a
        multiple of make-vocab-size-divisible-by x TP) are -inf: they never enter the softmax, so a real
        token's probability equals the unpadded model's, in the loss and in generation

Under CP > 1, MMSPSelfAttention takes only a table PlanRotaryEmbedding marked as whole (a table does not say whether
Megatron sliced it, which it does for sbhd micro-batches and not for thd), so a GPTModel built elsewhere needs
`use_plan_rope` whatever the micro-batch format.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from ..attention.megatron_core import mark_plan_rope_table
from .specs import LocalNorm, get_gpt_mmsp_layer_spec, validate_layer_spec

__all__ = ["build_gpt_model", "PlanRotaryEmbedding", "use_plan_rope", "mask_padded_vocab"]


class PlanRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose forward returns the whole, un-sliced table for positions 0..max_seq_len-1.

    GPTModel asks for the longest document of the micro-batch (packed_seq_params.max_seqlen_q), which is every
    position MM-SP's per-document indexing reads. `inv_freq` is a (non-persistent) buffer, so it moves with the
    model (`.to`, `.cuda`) instead of being copied to the device inside the first forward.
    """

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        return mark_plan_rope_table(self.get_emb(int(max_seq_len), offset))


def use_plan_rope(model: GPTModel) -> GPTModel:
    """Replace `model.rotary_pos_emb` (a RotaryEmbedding) by an equivalent PlanRotaryEmbedding, in place."""
    old = getattr(model, "rotary_pos_emb", None)
    if old is None or type(old) is not RotaryEmbedding:
        raise TypeError(f"use_plan_rope needs a GPTModel with position_embedding_type='rope' (plain RotaryEmbedding), "
                        f"got {type(old).__name__}")
    new = PlanRotaryEmbedding.__new__(PlanRotaryEmbedding)
    state = dict(old.__dict__)  # same inv_freq, scaling and interleaving: only forward differs
    inv_freq = state.pop("inv_freq")
    new.__dict__.update(state)
    new.register_buffer("inv_freq", inv_freq, persistent=False)
    model.rotary_pos_emb = new
    return model


def build_gpt_model(config, *, vocab_size: int, max_sequence_length: int, spec=None,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    share_embeddings_and_output_weights: bool = False, rotary_base: int = 10000,
                    rotary_percent: float = 1.0, vp_stage: Optional[int] = None,
                    cp_attention: str = "mmsp") -> GPTModel:
    """A RoPE GPTModel with MM-SP attention; pre/post_process default to this rank's pipeline stage.

    cp_attention="te_a2a_p2p" builds the same model as the baseline instead: Megatron's TE layer spec with TE's
    hierarchical a2a+p2p context parallelism and Megatron's own RoPE slicing (shard its batches with
    batch.gpt.shard_batch_te_cp). Needs Transformer Engine.
    """
    from megatron.core import parallel_state as ps

    if cp_attention == "te_a2a_p2p":
        from .specs import get_gpt_te_cp_layer_spec

        return GPTModel(config=config, transformer_layer_spec=spec or get_gpt_te_cp_layer_spec(),
                        vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
                        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
                        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
                        position_embedding_type="rope", rotary_base=rotary_base, rotary_percent=rotary_percent,
                        vp_stage=vp_stage)
    if cp_attention != "mmsp":
        raise ValueError(f"cp_attention={cp_attention!r}: choose 'mmsp' or 'te_a2a_p2p'")
    spec = get_gpt_mmsp_layer_spec() if spec is None else spec
    validate_layer_spec(spec, config, final_norm=LocalNorm)
    if getattr(getattr(spec, "submodules", None), "input_layernorm", None) is LocalNorm:
        # A bare layer spec gets Megatron's default final norm (torch's, which refuses sequence parallelism
        # without apex): give the block the same LocalNorm as its layers.
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                          layer_norm=LocalNorm)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
                     share_embeddings_and_output_weights=share_embeddings_and_output_weights,
                     position_embedding_type="rope", rotary_base=rotary_base, rotary_percent=rotary_percent,
                     vp_stage=vp_stage)
    return use_plan_rope(model)


class _PadLogitMask:
    """Forward hook of the output layer: -inf on the logits of this TP rank's padding columns, written in place
    (the logits are the largest activation of the model: [s, b, V/TP]; a masked copy would double them). The
    matmul that made them keeps its inputs, not its output, so autograd allows the write; the padding columns'
    gradient is zero."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, module, inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        first_pad = self.vocab_size - self.start(module, local)  # this rank's first padding column
        if first_pad < local:
            logits[..., max(first_pad, 0):].fill_(float("-inf"))
        return output

    @staticmethod
    def start(module, local: int) -> int:
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        return tp_rank * local


def mask_padded_vocab(model: GPTModel, vocab_size: int) -> GPTModel:
    """Mask the logits of the padding rows of `model`'s output layer (ids >= vocab_size) to -inf, in place.

    Only the last pipeline stage has an output layer; elsewhere this does nothing. Idempotent per model.
    """
    layer = getattr(model, "output_layer", None)
    if layer is None or getattr(layer, "_longvila_pad_mask", None) is not None:
        return model
    hook = _PadLogitMask(vocab_size)
    layer._longvila_pad_mask = hook
    layer.register_forward_hook(hook)
    return model

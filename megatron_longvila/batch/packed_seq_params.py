"""How a micro-batch's sharding plan reaches MM-SP attention inside Megatron's layers.

    MMSPPackedSeqParams(PackedSeqParams)   Megatron's packed-sequence parameters plus the sharding `plan`

GPTModel hands `packed_seq_params` unchanged to every layer's attention, so the plan travels with it: the
LongVILA model (models.longvila) and the GPT-only path (batch.gpt.shard_batch) build one per micro-batch, and
MM-SP's attention modules (attention.megatron_core) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.packed_seq_params import PackedSeqParams

from ..parallel.sharding import SequencePlan

__all__ = ["MMSPPackedSeqParams"]


@dataclass
class MMSPPackedSeqParams(PackedSeqParams):
    """Megatron's PackedSeqParams plus the MM-SP sharding plan of the micro-batch.

    `qkv_format` is "sbhd" ([s, b, h] hidden states; several documents may still be packed: the plan knows them) or
    "thd" (b == 1). `max_seqlen_q/kv` hold the longest document, which is what GPTModel asks the rotary embedding
    for.
    """

    plan: Optional[SequencePlan] = None
    inference: Optional[object] = None
    """The inference state during MM-SP inference (megatron_longvila.inference.cache.InferenceState): prefill stores
    each layer's K/V in the sharded cache, decode runs one replicated token against it."""

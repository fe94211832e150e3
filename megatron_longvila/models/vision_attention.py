"""The vision encoder's core attention on the local (non-TE) spec: bidirectional SDPA over one frame's patches.

Megatron's local `DotProductAttention` multiplies into a process-wide scratch buffer (`get_global_memory_buffer`)
and materializes every [heads, patches, patches] score matrix. SigLIP attends without a mask over the patches of
one frame, which is exactly `torch.nn.functional.scaled_dot_product_attention` (PyTorch's flash or
memory-efficient kernels on a GPU, its fused CPU kernel otherwise): no scratch buffer, no score matrix, and every
tensor on the device of its inputs. The TE spec keeps TEDotProductAttention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

__all__ = ["BidirectionalSDPA"]


class BidirectionalSDPA(MegatronModule):
    """Megatron core_attention: q, k, v [s, b, heads, d] (this TP rank's heads) -> [s, b, heads * d], no mask."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.no_mask:
            raise ValueError(f"BidirectionalSDPA attends without a mask (SigLIP); got {attn_mask_type.name}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention dropout {dropout}: the vision encoder's attention has none; set it to 0")
        if config.context_parallel_size != 1:
            raise ValueError("the vision encoder never uses context parallelism (MM-SP shards whole frames)")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("BidirectionalSDPA takes no mask, bias or packed sequences (one frame per batch row)")
        s, b, h, d = query.shape
        if key.shape[2] != h:  # GQA (not in SigLIP): repeat KV heads
            key = key.repeat_interleave(h // key.shape[2], dim=2)
            value = value.repeat_interleave(h // value.shape[2], dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

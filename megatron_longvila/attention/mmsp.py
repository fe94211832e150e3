"""MM-SP 2D attention: Ulysses all-to-all over heads x zigzag ring over sequence, per document."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..parallel.sharding import SequencePlan
from .backends import get_backend
from .ring import RingAttention
from ..plan.ulysses import head_layout
from .ulysses import heads_to_seq, seq_to_heads


def mmsp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SequencePlan, *, causal: bool = True,
                   softmax_scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Attention over a sequence sharded by `plan` across the MM-SP mesh.

    Args:
        q: [s_local, b, heads_q, d], this rank's tokens (from `plan.shard`).
        k, v: [s_local, b, heads_kv, d]; heads_q must be a multiple of heads_kv (GQA/MQA); heads need not
            divide the Ulysses size.
        plan: the sequence plan (`plan_sequence`); tokens of different documents never attend to each other.
        causal: causal mask inside each document; False attends to the whole document.
        softmax_scale: defaults to 1/sqrt(d).
        backend: local kernel: "auto", "cpu", "torch_cuda", "te" or "math".

    Returns:
        [s_local, b, heads_q, d]; rows of pad tokens (uniform plans) are zero.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"mmsp_attention expects [s, b, heads, d] tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    s, b, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != s or k.shape[1] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [{s}, {b}, heads_kv, {d}], got k{tuple(k.shape)} v{tuple(v.shape)}")
    if s != plan.local_len:
        raise ValueError(f"q has {s} tokens but the plan gives this rank {plan.local_len}: shard q, k, v with "
                         f"plan.shard (or build the plan for this sequence)")
    hkv = k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    kernel = get_backend(backend, q)
    mesh = plan.mesh
    layout = head_layout(hq, hkv, mesh.ulysses_size)
    group = mesh.ulysses_group
    q_heads = [tuple(range(a, b_)) for a, b_ in layout.q_ranges]
    qr = seq_to_heads(q, q_heads, plan, group, "ulysses_q")
    kr = seq_to_heads(k, layout.kv_heads, plan, group, "ulysses_k")
    vr = seq_to_heads(v, layout.kv_heads, plan, group, "ulysses_v")
    S, _, h_me, _ = qr.shape
    hkv_me = kr.shape[2]
    # Fold batch into heads: query head (b, h) uses KV head (b, h // g), which is what a flat GQA index gives.
    out = RingAttention.apply(qr.reshape(S, b * h_me, d), kr.reshape(S, b * hkv_me, d),
                              vr.reshape(S, b * hkv_me, d), plan, mesh.ring_group, causal, scale, kernel)
    out = out.view(S, b, h_me, d)
    return heads_to_seq(out, layout.q_ranges, plan, group, "ulysses_out")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens, *, causal: bool = True,
                        softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Single-process attention on the full sequence, one document at a time, with PyTorch's own
    scaled_dot_product_attention (independent of this package's kernels): the oracle for tests."""
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    outs, start = [], 0
    for n in seq_lens:
        qq, kk, vv = (t[start:start + n].permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, n, d]
        if hkv != hq:
            kk = kk.repeat_interleave(hq // hkv, dim=1)
            vv = vv.repeat_interleave(hq // hkv, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=softmax_scale)
        outs.append(o.permute(2, 0, 1, 3))
        start += n
    return torch.cat(outs)

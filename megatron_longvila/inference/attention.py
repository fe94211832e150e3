"""Decode attention of MM-SP inference: one replicated token against the sharded KV cache, merged exactly.

Per layer and decode step, on every rank of the CP group: project the token's q, k, v (all of this TP rank's heads;
the hidden state and the weights are replicated over CP), apply RoPE at its position, let the step's owner append
k, v to its cache, attend q to the local cache with the layer's own kernel (it returns the log-sum-exp), and merge
the P partial results by log-sum-exp:

    m = max_c lse_c,  w_c = exp(lse_c - m),  o = sum_c w_c o_c / sum_c w_c

A rank whose shard is empty contributes lse = -inf, hence w = 0. Two ways to merge (`MERGES`), both fp32, neither
moves K/V, both a few KB per layer whatever the context length:

- "all_gather" (the default): one all-gather of each rank's [o, lse] (heads x (head_dim + 1) floats), merged locally
  in rank order, so every rank computes the same bits. One collective per layer: P - 1 ring steps.
- "all_reduce": a MAX all-reduce of lse (heads floats), then a SUM all-reduce of [w o, w] (heads x (head_dim + 1)).
  Two collectives per layer: 4 (P - 1) ring steps.

Bytes a rank sends per layer (comm.py's counts; H heads, D head dim, P ranks): all-gather 4 (P-1) H (D+1), two
all-reduces 4 x 2(P-1)/P x H (D+2). They are equal at P = 2 + 2/(D+1) (just above 2): the all-gather sends fewer
bytes at P = 2 and P/2 x (D+1)/(D+2) times as many at P >= 3 (1.5x at P = 4 ... 4x at P = 8 ... 32x at P = 64).
Per layer that is still small (H = 28, D = 128, P = 8: 101 KB against 25 KB) and a decode step is latency-bound:
with a per-step latency a and a bandwidth b, the all-gather is faster while its extra bytes take less than the
3 (P-1) ring steps it saves, i.e. while 4 H (D+1) (P-2)/P < 3 a b (a = 5 us, b = 100 GB/s: partials below about
2 MB per rank, far above any decode partial).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.backends import get_backend
from ..parallel import comm
from ..plan.segments import Segments

__all__ = ["decode_self_attention", "decode_bytes_per_layer", "merge_partials", "MERGES", "DECODE_STATS"]

MERGES = ("all_gather", "all_reduce")
"""The decode merges (see the module docstring)."""

DECODE_STATS = {"pairs": 0}
"""Query-key pairs x query heads this rank computed in decode steps (benchmarks: attention work per rank)."""


def decode_bytes_per_layer(heads: int, head_dim: int, cp_size: int, batch: int = 1, merge: str = "all_gather") -> int:
    """Bytes one rank sends per layer and decode step (comm.py's counts: an all-gather sends the rank's buffer to each
    of the P - 1 others; a ring all-reduce sends 2(P-1)/P of its buffer)."""
    _check_merge(merge)
    if cp_size == 1:
        return 0
    if merge == "all_gather":
        return 4 * batch * heads * (head_dim + 1) * (cp_size - 1)
    numel_max, numel_sum = batch * heads, batch * heads * (head_dim + 1)
    return 4 * (numel_max * 2 * (cp_size - 1) // cp_size + numel_sum * 2 * (cp_size - 1) // cp_size)


def _check_merge(merge: str) -> None:
    if merge not in MERGES:
        raise ValueError(f"decode merge {merge!r}: choose one of {', '.join(MERGES)}")


def merge_partials(o: torch.Tensor, lse: torch.Tensor, group, merge: str = "all_gather") -> torch.Tensor:
    """Exact merge of per-rank partial attention: o [n, H, D] fp32, lse [H, n] fp32 -> merged o [n, H, D]."""
    _check_merge(merge)
    if group is None or dist.get_world_size(group) == 1:
        return o
    if merge == "all_gather":
        world = dist.get_world_size(group)
        buf = torch.cat([o.reshape(-1), lse.reshape(-1)])
        flat = buf.new_empty(world * buf.numel())  # gloo takes a flat output
        comm.all_gather_into_tensor(flat, buf, group, kind="decode_gather")
        parts = flat.view(world, buf.numel())
        o_all = parts[:, :o.numel()].view((world,) + tuple(o.shape))  # [P, n, H, D]
        lse_all = parts[:, o.numel():].view((world,) + tuple(lse.shape))  # [P, H, n]
        m = lse_all.amax(0)  # finite: some rank holds the token itself
        w = torch.exp(lse_all - m)  # -inf (empty shard) -> 0
        num = (o_all * w.transpose(1, 2).unsqueeze(-1)).sum(0)
        return num / w.sum(0).transpose(0, 1).unsqueeze(-1)
    m = lse.clone()
    comm.all_reduce(m, group, op=dist.ReduceOp.MAX, kind="decode_lse_max")
    w = torch.exp(lse - m)  # -inf (empty shard) -> 0; m is finite: some rank holds the token itself
    wt = w.transpose(0, 1).unsqueeze(-1)  # [n, H, 1]
    buf = torch.cat([(o * wt).reshape(-1), w.reshape(-1)])
    comm.all_reduce(buf, group, kind="decode_merge")
    num = buf[:o.numel()].view(o.shape)
    den = buf[o.numel():].view(w.shape).transpose(0, 1).unsqueeze(-1)
    return num / den


def decode_self_attention(module, hidden_states: torch.Tensor, rotary_pos_emb, state):
    """MMSPSelfAttention's decode step (see the module docstring): returns (output, bias) as SelfAttention does."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    if hidden_states.shape[0] != 1:
        raise ValueError(f"decode takes one token per step, got {hidden_states.shape[0]}")
    query, key, value = module.get_query_key_value_tensors(hidden_states)  # [1, b, heads, d]
    if rotary_pos_emb is not None:
        tables = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        p = state.position - state.rope_offset  # the table's rows start at position rope_offset
        if not 0 <= p < tables[0].shape[0]:
            raise ValueError(f"position {state.position} is outside the rotary table (positions {state.rope_offset} "
                             f"to {state.rope_offset + tables[0].shape[0] - 1})")
        query = apply_rotary_pos_emb(query, tables[0][p:p + 1], config=module.config)
        key = apply_rotary_pos_emb(key, tables[1][p:p + 1], config=module.config)
    mesh = state.mesh
    cache = state.cache
    k_all, v_all = cache.keys_for_step(module.layer_number, key, value, append=state.owner == mesh.cp_rank)
    _, b, hq, d = query.shape
    if b != 1:
        raise ValueError("MM-SP decode runs one prompt at a time (batch 1)")
    core = module.core_attention
    q = query[0]  # [1, hq, d]
    n = k_all.shape[0]
    if n == 0:
        o = torch.zeros((1, hq, d), dtype=torch.float32, device=q.device)
        lse = torch.full((hq, 1), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        seg = state.segments.get(n) if state.segments is not None else None
        seg = seg or Segments([0, 1], [0, n], False)
        kernel = get_backend(core.backend, q)
        o, lse = kernel.forward(q, k_all[:, 0], v_all[:, 0], seg, core.softmax_scale)
        DECODE_STATS["pairs"] += n * hq
        o, lse = o.float(), lse.float()
    o = merge_partials(o, lse, mesh.cp_group if mesh.cp_size > 1 else None, state.merge)
    out = o.to(query.dtype).reshape(1, 1, hq * d)
    return module.linear_proj(out)

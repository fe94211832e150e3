"""Analytic communication and work of MM-SP attention: pure functions of the plan and the shapes.

`comm_bytes_min` is the data volume each rank must send for one forward and backward of 2D attention:
- Ulysses: each rank keeps its own heads of its own tokens and sends every other (token, head) once, in
  both directions (q, k, v in; out back), and the same for the gradients (dout in; dq, dk, dv back).
  KV heads needed by several Ulysses ranks (GQA with fewer KV heads than U) must reach each of them.
- Ring: a KV buffer visits the R-1 other ring ranks (R-1 hops) in the forward and again in the backward
  (nothing holds the full sequence); each block's dK/dV accumulator makes R-1 hops home. Accumulators
  travel in fp32 (fp64 for fp64 inputs) whatever the input dtype, because summing partial gradients hop by hop in
  bf16 loses precision.
Pad tokens (uniform plans) are not counted: the minimum is over real tokens.
"""

from __future__ import annotations

from typing import Dict, List

from ..parallel.sharding import SequencePlan
from ..plan.sequence import coords_of
from ..plan.ulysses import head_layout

ACC_BYTES = 4


def comm_bytes_min(plan: SequencePlan, batch: int, heads_q: int, heads_kv: int, head_dim: int,
                   elem_bytes: int) -> List[Dict[str, int]]:
    """Per CP rank: {"ulysses": bytes, "ring": bytes, "total": bytes} for forward + backward."""
    U, R = plan.ulysses_size, plan.ring_size
    lay = head_layout(heads_q, heads_kv, U)
    hq = [b - a for a, b in lay.q_ranges]
    hkv = [len(x) for x in lay.kv_heads]
    row = batch * head_dim * elem_bytes
    out = []
    for cr in range(plan.cp_size):
        r, u = coords_of(cr, U, R, plan.mesh.ring_first)
        real = plan.ring_pad_layout(r)[0]
        s_me = real[u]
        others = [t for t in range(U) if t != u]
        uly = 0
        if U > 1:
            # forward: q, k, v to the head owners; out back to the token owners
            uly += s_me * row * sum(hq[t] for t in others)
            uly += 2 * s_me * row * sum(hkv[t] for t in others)
            uly += sum(real[t] for t in others) * row * hq[u]
            # backward: dout to the head owners; dq, dk, dv back to the token owners
            uly += s_me * row * sum(hq[t] for t in others)
            uly += sum(real[t] for t in others) * row * (hq[u] + 2 * hkv[u])
        ring = 0
        if R > 1 and hq[u] > 0:
            kv_row = batch * hkv[u] * head_dim
            fwd_kv = sum(plan.ring_lens[(r - s) % R] for s in range(R - 1)) * kv_row * elem_bytes * 2
            acc = sum(plan.ring_lens[(r - s) % R] for s in range(1, R)) * kv_row * max(ACC_BYTES, elem_bytes) * 2
            ring = 2 * fwd_kv + acc
        out.append({"ulysses": uly, "ring": ring, "total": uly + ring})
    return out

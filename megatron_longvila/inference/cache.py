"""The sharded KV cache of MM-SP inference: every rank of the CP group holds the K/V of its own tokens.

Layout ("flat"): rank c keeps, per layer, the K and V it projected for the prompt tokens it holds under the
sequence plan (RoPE at their positions already applied, all KV heads of its tensor-parallel rank): exactly the
tensors its core attention receives before the Ulysses all-to-all. That is the layout a one-time inverse Ulysses
all-to-all of the post-all-to-all K/V would produce, without the all-to-all: the cache costs no traffic to build.
Against the 2D layout (ring chunk x head block, the post-all-to-all K/V), it holds no replicated KV heads when
KV heads < U and makes decode one flat log-sum-exp merge over the CP group, with no head-divisibility rule.
Pad tokens of uniform plans never enter it.

Decode token i is appended, in every layer, by exactly one rank: CP rank i mod P (round-robin, so the shards stay
within one token of each other; the zigzag prefill shards are equal to within a few tokens already). No K/V moves
during decode.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .attention import decode_self_attention

__all__ = ["ShardedKVCache", "InferenceState"]


class ShardedKVCache:
    """This rank's K/V per layer (see the module docstring).

    Args:
        cp_rank, cp_size: this rank's place in the CP group.
        reserve: decode tokens this rank may append (capacity beyond the prompt, allocated at prefill).
    """

    def __init__(self, cp_rank: int, cp_size: int, reserve: int = 0):
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.reserve = int(reserve)
        self.k: Dict[int, torch.Tensor] = {}
        self.v: Dict[int, torch.Tensor] = {}
        self.length = 0
        """Tokens held (the same in every layer)."""
        self.positions: List[int] = []
        """Sequence position of each token held, in cache order."""

    # -- prefill ---------------------------------------------------------------------------------------------
    def store_prefill(self, layer: int, key: torch.Tensor, value: torch.Tensor, plan) -> None:
        """Keep this rank's real prompt tokens of one layer (called by MMSPCoreAttention during prefill)."""
        if key.dim() == 3:  # thd -> sbhd with b = 1
            key, value = key.unsqueeze(1), value.unsqueeze(1)
        real = plan.real_lens[plan.mesh.cp_rank]
        n = real + self.reserve
        k = key.new_empty((n,) + tuple(key.shape[1:]))
        v = value.new_empty((n,) + tuple(value.shape[1:]))
        k[:real].copy_(key[:real])
        v[:real].copy_(value[:real])
        self.k[layer], self.v[layer] = k, v
        if not self.positions and real:
            self.positions = plan.token_index().tolist()
        self.length = real

    # -- decode ----------------------------------------------------------------------------------------------
    def keys_for_step(self, layer: int, key: torch.Tensor, value: torch.Tensor, append: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """K/V this rank attends the decode token to; with `append`, the token's own K/V written first (so it
        attends to itself). key/value: [1, b, hkv, d]."""
        n = self.length
        if append:
            if n >= self.k[layer].shape[0]:
                raise RuntimeError(f"KV cache of CP rank {self.cp_rank} is full ({n} tokens): reserve more decode room")
            self.k[layer][n:n + 1].copy_(key)
            self.v[layer][n:n + 1].copy_(value)
            n += 1
        return self.k[layer][:n], self.v[layer][:n]

    def advance(self, owner: int, position: int) -> None:
        """After a decode step: the owner now holds one more token."""
        if owner == self.cp_rank:
            self.length += 1
            self.positions.append(position)

    def bytes(self) -> int:
        """Bytes of K/V this rank holds (the filled part)."""
        return sum(2 * self.length * math.prod(t.shape[1:]) * t.element_size() for t in self.k.values())

    def gather(self, group) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's K/V per layer in sequence order (tests: the cache equals the single-process cache)."""
        out = {}
        world = 1 if group is None else dist.get_world_size(group)
        positions: List[Optional[List[int]]] = [self.positions] if world == 1 else [None] * world
        if world > 1:
            dist.all_gather_object(positions, self.positions, group=group)
        for layer in sorted(self.k):
            mine = (self.k[layer][:self.length].cpu(), self.v[layer][:self.length].cpu())
            parts: List[Optional[tuple]] = [mine] if world == 1 else [None] * world
            if world > 1:
                dist.all_gather_object(parts, mine, group=group)
            order = torch.argsort(torch.tensor([q for p in positions for q in p], dtype=torch.long))
            k = torch.cat([p[0] for p in parts])[order]
            v = torch.cat([p[1] for p in parts])[order]
            out[layer] = (k, v)
        return out


class InferenceState:
    """What the layers need for one inference forward (carried in MMSPPackedSeqParams.inference).

    mode: "prefill" (store each layer's K/V) or "decode" (one token against the cache).
    position: the decode token's position (RoPE); owner: the CP rank that appends it; segments: the local
    attention's varlen segments for this step (device offsets built once per step, not per layer); rope_offset: the
    position of the decode rotary table's first row (decode builds rows for the new tokens only, once per call);
    merge: how the partials merge over CP (inference.attention.MERGES).
    """

    def __init__(self, cache: ShardedKVCache, mesh, mode: str = "prefill"):
        self.cache = cache
        self.mesh = mesh
        self.mode = mode
        self.position = 0
        self.owner = 0
        self.segments = None
        self.rope_offset = 0
        self.merge = "all_gather"

    def decode_self_attention(self, module, hidden_states, rotary_pos_emb):
        """MMSPSelfAttention's forward in decode mode: this state's token against the sharded cache (the attention
        layer asks the state, so attention/ needs nothing of inference/)."""
        return decode_self_attention(module, hidden_states, rotary_pos_emb, self)

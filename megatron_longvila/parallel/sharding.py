"""Sharding plans bound to a mesh: which tokens of a (packed) sequence this rank of the U x R MM-SP mesh owns, and the
autograd-aware shard / gather between the whole sequence and this rank's tokens.

The layout itself (zigzag per document over the ring, Ulysses pieces inside, optional uniform padding) is a pure
function of the lengths and sizes: plan.sequence.SequenceLayout, documented there. `plan_sequence(mesh, seq_lens)`
binds it to a mesh: the plan knows this rank's coordinates and its CP group, gathers over it, and puts the index
tensors its forward and backward read on the device once (`to`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import PlanError
from ..plan.ring import prepare_ring_blocks
from ..plan.sequence import SequenceLayout
from ..plan.ulysses import compact_index
from . import comm
from .mesh import MMSPMesh

__all__ = ["SequencePlan", "plan_sequence", "PlanError"]


class SequencePlan(SequenceLayout):
    """The token layout of one (packed) sequence over an MM-SP mesh, seen from this rank. Built by `plan_sequence`."""

    def __init__(self, mesh: MMSPMesh, seq_lens: Sequence[int], *, uniform: bool = False,
                 pad_to_multiple: int = 1):
        super().__init__(mesh.ulysses_size, mesh.ring_size, seq_lens, ring_first=mesh.ring_first,
                         cp_rank=mesh.cp_rank, uniform=uniform, pad_to_multiple=pad_to_multiple)
        self.mesh = mesh

    def to(self, device, coords: bool = False) -> "SequencePlan":
        """Put every index tensor this rank's forward and backward use on `device`, once; returns self. `coords`:
        also the ring blocks' padded-layout coordinates (Transformer Engine's FP8 attention reads them).

        Host-to-device copies are asynchronous from pinned memory where the build has it (CUDA); after this,
        attention, RoPE, gather and routing read device tensors only: no host synchronization inside the model.
        """
        self.local_token_index(device)
        self.local_position_ids(device)
        if self.cp_size > 1:
            self._gather_index(device)
        compact_index(self, self.mesh.ring_rank, device)
        prepare_ring_blocks(self, self.mesh.ring_rank, device, coords)
        return self

    # ------------------------------------------------------------------------------------------------
    # Shard / gather
    # ------------------------------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """Full sequence -> this rank's tokens (pads appended as zeros when the plan is uniform)."""
        if x.shape[seq_dim] != self.total_len:
            raise PlanError(f"plan.shard: dimension {seq_dim} has {x.shape[seq_dim]} tokens, the plan covers "
                            f"{self.total_len} (documents {self.seq_lens})")
        idx = self.local_token_index(x.device)
        return _pad_tail(x.index_select(seq_dim, idx), seq_dim, self.local_len - idx.numel())

    def gather(self, x_local: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """This rank's tokens -> the full sequence on every CP rank (the inverse of `shard`, pads removed).

        Autograd: the gathered tensor is treated as replicated, each rank's gradient for its own tokens is
        its own upstream gradient at those positions (as when every rank computes the same loss on it).
        """
        if x_local.shape[seq_dim] != self.local_len:
            raise PlanError(f"plan.gather: dimension {seq_dim} has {x_local.shape[seq_dim]} tokens, this rank "
                            f"holds {self.local_len}")
        if self.cp_size == 1:
            return x_local.narrow(seq_dim, 0, self.total_len)
        return _Gather.apply(x_local, self, seq_dim)

    def _gather_index(self, device) -> torch.Tensor:
        """Rows of the rank-major all-gather buffer (each rank padded to max local length) in global order."""
        def build():
            m = max(self.local_lens)
            inv = torch.empty(self.total_len, dtype=torch.long)
            for cr in range(self.cp_size):
                idx = self._real_index[cr]
                inv[idx] = torch.arange(idx.numel()) + cr * m
            return inv

        return self.on_device("gather_index", device, build)


def _pad_tail(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Append `pad` zero rows along `dim` (a uniform plan's pad tokens)."""
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan: SequencePlan, seq_dim: int):
        ctx.plan, ctx.seq_dim = plan, seq_dim
        x = x_local.movedim(seq_dim, 0)
        m = max(plan.local_lens)
        if x.shape[0] < m:
            x = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        x = x.contiguous()
        buf = x.new_empty((plan.cp_size * m,) + tuple(x.shape[1:]))
        comm.all_gather_into_tensor(buf, x, plan.mesh.cp_group, kind="plan_gather")
        full = buf.index_select(0, plan._gather_index(buf.device))
        return full.movedim(0, seq_dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        plan, seq_dim = ctx.plan, ctx.seq_dim
        idx = plan.local_token_index(grad.device)
        return _pad_tail(grad.index_select(seq_dim, idx), seq_dim, plan.local_len - idx.numel()), None, None


def plan_sequence(mesh: MMSPMesh, seq_lens: Sequence[int], *, uniform: bool = False,
                  pad_to_multiple: int = 1) -> SequencePlan:
    """Plan how a sequence of packed documents with lengths `seq_lens` is sharded over `mesh`.

    Args:
        mesh: the MM-SP mesh (`build_mmsp_mesh`).
        seq_lens: the lengths of the documents packed in one sequence (one entry for an unpacked sequence).
            Any positive lengths are accepted, including 1, primes and lengths shorter than the mesh.
        uniform: pad so that every rank holds the same number of tokens (Megatron pipeline schedules).
        pad_to_multiple: with `uniform`, make the local length a multiple of this (tensor-parallel
            sequence parallelism needs a multiple of the TP size).
    """
    return SequencePlan(mesh, seq_lens, uniform=uniform, pad_to_multiple=pad_to_multiple)

"""Sharding plans: which tokens of a (packed) sequence each rank of the U x R MM-SP mesh owns.

Layout, per document of a packed sequence (documents never attend to each other):
- the document is cut into 2R contiguous chunks; ring rank r owns chunks r and 2R-1-r (zigzag), which
  balances causal attention work over the ring. Lengths need not divide anything: chunk sizes differ by at
  most one token, and the extra tokens rotate over ring ranks from one document to the next;
- a ring rank's shard is its two chunks of every document, document after document (the "ring buffer");
- the ring buffer is cut into U contiguous, near-equal pieces, one per Ulysses rank. After the Ulysses
  all-to-all every rank of a Ulysses group holds the whole ring buffer for its share of the heads.

Nothing is padded by default, so local lengths may differ by a few tokens between ranks. `uniform=True`
(with `pad_to_multiple`) appends pad tokens so every rank holds the same length, as Megatron's pipeline
schedules and tensor-parallel sequence parallelism need; pad tokens belong to no document, attend to
nothing, produce zeros and receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import comm
from .mesh import MMSPMesh, cp_rank_of


class PlanError(ValueError):
    """A sequence layout the sharding plan cannot serve."""


@dataclass(frozen=True)
class DocSlice:
    """One document's tokens inside one ring rank's (compact) ring buffer."""

    doc: int
    """Index of the document in the packed sequence."""
    offset: int
    """Start of the document's tokens in the ring buffer."""
    len_a: int
    """Tokens of the early chunk (chunk r)."""
    len_b: int
    """Tokens of the late chunk (chunk 2R-1-r)."""
    start_a: int
    """Global position of the early chunk's first token."""
    start_b: int
    """Global position of the late chunk's first token."""

    @property
    def length(self) -> int:
        return self.len_a + self.len_b


def zigzag_chunk_sizes(seq_lens: Sequence[int], ring_size: int) -> List[List[int]]:
    """Sizes of the 2R chunks of each document; extra tokens rotate over ring ranks across documents."""
    out = []
    offset = 0
    two_r = 2 * ring_size
    for length in seq_lens:
        base, rem = divmod(length, two_r)
        extras = [0] * ring_size
        for t in range(rem):
            extras[(offset + t) % ring_size] += 1
        offset = (offset + rem) % ring_size
        sizes = [base] * two_r
        for k in range(ring_size):
            # rank k owns chunks k and 2R-1-k; its first extra token goes to its early chunk
            sizes[k] += 1 if extras[k] >= 1 else 0
            sizes[two_r - 1 - k] += 1 if extras[k] >= 2 else 0
        out.append(sizes)
    return out


def _split_even(n: int, parts: int) -> List[int]:
    base, rem = divmod(n, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


class SequencePlan:
    """The token layout of one (packed) sequence over an MM-SP mesh. Built by `plan_sequence`."""

    def __init__(self, mesh: MMSPMesh, seq_lens: Sequence[int], *, uniform: bool = False,
                 pad_to_multiple: int = 1):
        seq_lens = [int(x) for x in seq_lens]
        if not seq_lens:
            raise PlanError("seq_lens is empty: give the length of each document packed in the sequence "
                            "(one entry for an unpacked sequence)")
        bad = [x for x in seq_lens if x < 1]
        if bad:
            raise PlanError(f"document lengths must be >= 1, got {bad}: drop empty documents before packing")
        if pad_to_multiple < 1:
            raise PlanError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        if pad_to_multiple > 1 and not uniform:
            raise PlanError("pad_to_multiple needs uniform=True (padding is appended to equalize local lengths)")
        self.mesh = mesh
        self.seq_lens = seq_lens
        self.total_len = sum(seq_lens)
        R, U = mesh.ring_size, mesh.ulysses_size
        self.ring_size, self.ulysses_size, self.cp_size = R, U, R * U
        self.doc_starts = [0]
        for x in seq_lens[:-1]:
            self.doc_starts.append(self.doc_starts[-1] + x)
        self.chunk_sizes = zigzag_chunk_sizes(seq_lens, R)

        # Ring buffers (compact: real tokens only) and their document slices.
        self.ring_docs: List[List[DocSlice]] = []
        self.ring_index: List[torch.Tensor] = []
        for r in range(R):
            docs, idx, off = [], [], 0
            for d, (start, sizes) in enumerate(zip(self.doc_starts, self.chunk_sizes)):
                a, b = r, 2 * R - 1 - r
                sa = start + sum(sizes[:a])
                sb = start + sum(sizes[:b])
                la, lb = sizes[a], sizes[b]
                if la + lb == 0:
                    continue
                docs.append(DocSlice(doc=d, offset=off, len_a=la, len_b=lb, start_a=sa, start_b=sb))
                idx.append(torch.arange(sa, sa + la))
                idx.append(torch.arange(sb, sb + lb))
                off += la + lb
            self.ring_docs.append(docs)
            self.ring_index.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long))
        self.ring_lens = [int(t.numel()) for t in self.ring_index]

        # Ulysses pieces of each ring buffer.
        self.ulysses_splits = [_split_even(n, U) for n in self.ring_lens]
        self.real_lens: List[int] = [0] * self.cp_size
        self._real_index: List[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * self.cp_size
        for r in range(R):
            pos = 0
            for u, n in enumerate(self.ulysses_splits[r]):
                cr = cp_rank_of(r, u, U, R, mesh.ring_first)
                self._real_index[cr] = self.ring_index[r][pos:pos + n]
                self.real_lens[cr] = n
                pos += n
        if uniform:
            m = max(self.real_lens)
            m = -(-m // pad_to_multiple) * pad_to_multiple
            self.local_lens = [m] * self.cp_size
        else:
            self.local_lens = list(self.real_lens)
        self.padded = any(l != n for l, n in zip(self.local_lens, self.real_lens))
        self.max_doc_len = max(seq_lens)
        # Derived blocks and index tensors, per device. They belong to this plan: freed with it, after the last
        # autograd node that holds the plan (the micro-batch's backward, recompute included) is gone.
        self._block_cache: Dict[tuple, object] = {}

    # ------------------------------------------------------------------------------------------------
    # Layout queries
    # ------------------------------------------------------------------------------------------------
    @property
    def local_len(self) -> int:
        """Tokens this rank holds (padding included)."""
        return self.local_lens[self.mesh.cp_rank]

    def token_index(self, cp_rank: Optional[int] = None) -> torch.Tensor:
        """Global positions of the real tokens a CP rank holds, in its local order (pads, if any, follow)."""
        return self._real_index[self.mesh.cp_rank if cp_rank is None else cp_rank]

    def position_ids(self, cp_rank: Optional[int] = None) -> torch.Tensor:
        """Position of each local token inside its own document (pads get 0), e.g. for RoPE."""
        cr = self.mesh.cp_rank if cp_rank is None else cp_rank
        full = torch.cat([torch.arange(n) for n in self.seq_lens])
        pos = full[self.token_index(cr)]
        pad = self.local_lens[cr] - pos.numel()
        return torch.cat([pos, pos.new_zeros(pad)]) if pad else pos

    # ------------------------------------------------------------------------------------------------
    # Index tensors on the compute device
    # ------------------------------------------------------------------------------------------------
    def on_device(self, name: str, device, build) -> torch.Tensor:
        """The plan-owned copy on `device` of the host index tensor `build()` (built and copied once).

        `to(device)` fills these before a step, so the step's forward and backward only look them up; an entry
        missing there is built and copied on first use (the standalone API, which pays a host copy then).
        """
        device = torch.device(device)
        key = ("dev", name, device.type, device.index)
        hit = self._block_cache.get(key)
        if hit is None:
            host = build()
            hit = host if device.type == "cpu" else host_to_device(host, device)
            self._block_cache[key] = hit
        return hit

    def local_token_index(self, device) -> torch.Tensor:
        """`token_index()` of this rank on `device`."""
        return self.on_device("token_index", device, self.token_index)

    def local_position_ids(self, device) -> torch.Tensor:
        """`position_ids()` of this rank on `device` (what RoPE indexes its table with)."""
        return self.on_device("position_ids", device, self.position_ids)

    def to(self, device) -> "SequencePlan":
        """Put every index tensor this rank's forward and backward use on `device`, once; returns self.

        Host-to-device copies are asynchronous from pinned memory where the build has it (CUDA); after this,
        attention, RoPE, gather and routing read device tensors only: no host synchronization inside the model.
        """
        from ..attention.ring import prepare_ring_blocks
        from ..attention.ulysses import compact_index

        self.local_token_index(device)
        self.local_position_ids(device)
        if self.cp_size > 1:
            self._gather_index(device)
        compact_index(self, self.mesh.ring_rank, device)
        prepare_ring_blocks(self, device)
        return self

    def ring_pad_layout(self, ring_rank: int) -> Tuple[List[int], List[int]]:
        """Per Ulysses rank of a ring: (real tokens, local length incl. pads) as they arrive in the all-to-all."""
        U, R = self.ulysses_size, self.ring_size
        crs = [cp_rank_of(ring_rank, u, U, R, self.mesh.ring_first) for u in range(U)]
        return [self.real_lens[c] for c in crs], [self.local_lens[c] for c in crs]

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


def host_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: from pinned memory, asynchronously, where the build supports pinning (a CUDA
    build; the CPU build has no pinned memory). The caching host allocator keeps the pinned copy alive until the
    transfer is done."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda" and torch.cuda.is_available():
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


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

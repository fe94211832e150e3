"""The token layout of a packed sequence over a U x R MM-SP mesh: a pure function of the document lengths and the
mesh sizes (parallel.sharding binds it to a real mesh and adds the collectives).

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

    cp_rank_of(r, u, U, R, ring_first) / coords_of(cp_rank, U, R, ring_first)   mesh coordinates
    zigzag_chunk_sizes(seq_lens, R), split_even(n, parts)
    SequenceLayout(ulysses_size, ring_size, seq_lens, *, ring_first, cp_rank, uniform, pad_to_multiple)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import PlanError
from ..runtime.device import host_to_device

__all__ = ["cp_rank_of", "coords_of", "zigzag_chunk_sizes", "split_even", "DocSlice", "SequenceLayout", "PlanError"]


def cp_rank_of(r: int, u: int, ulysses_size: int, ring_size: int, ring_first: bool = False) -> int:
    """CP-group index of mesh coordinate (ring rank r, Ulysses rank u)."""
    return u * ring_size + r if ring_first else r * ulysses_size + u


def coords_of(cp_rank: int, ulysses_size: int, ring_size: int, ring_first: bool = False) -> Tuple[int, int]:
    """Mesh coordinate (r, u) of a CP-group index."""
    if ring_first:
        return cp_rank % ring_size, cp_rank // ring_size
    return cp_rank // ulysses_size, cp_rank % ulysses_size


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


def split_even(n: int, parts: int) -> List[int]:
    """`n` items in `parts` contiguous pieces whose sizes differ by at most one (the first ones larger)."""
    base, rem = divmod(n, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


class SequenceLayout:
    """Which tokens of a packed sequence each rank of a U x R mesh holds, seen from CP rank `cp_rank`.

    Args:
        ulysses_size, ring_size: U and R.
        seq_lens: the lengths of the documents packed in the sequence (one entry for an unpacked sequence); any
            positive lengths, including 1, primes and lengths shorter than the mesh.
        ring_first: ring ranks (rather than Ulysses ranks) are consecutive CP ranks.
        cp_rank: the rank whose view `local_len`, `token_index()` and `position_ids()` give by default.
        uniform: pad so that every rank holds the same number of tokens.
        pad_to_multiple: with `uniform`, make the local length a multiple of this.
    """

    def __init__(self, ulysses_size: int, ring_size: int, seq_lens: Sequence[int], *, ring_first: bool = False,
                 cp_rank: int = 0, uniform: bool = False, pad_to_multiple: int = 1):
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
        self.seq_lens = seq_lens
        self.total_len = sum(seq_lens)
        R, U = ring_size, ulysses_size
        self.ring_size, self.ulysses_size, self.cp_size = R, U, R * U
        self.ring_first = ring_first
        self.cp_rank = cp_rank
        self.ring_rank, self.ulysses_rank = coords_of(cp_rank, U, R, ring_first)
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
        self.ulysses_splits = [split_even(n, U) for n in self.ring_lens]
        self.real_lens: List[int] = [0] * self.cp_size
        self._real_index: List[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * self.cp_size
        for r in range(R):
            pos = 0
            for u, n in enumerate(self.ulysses_splits[r]):
                cr = cp_rank_of(r, u, U, R, ring_first)
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
        # Derived blocks and index tensors, per device. They belong to this layout: freed with it, after the last
        # autograd node that holds it (the micro-batch's backward, recompute included) is gone.
        self._block_cache: Dict[tuple, object] = {}

    # ------------------------------------------------------------------------------------------------
    # Layout queries
    # ------------------------------------------------------------------------------------------------
    @property
    def local_len(self) -> int:
        """Tokens this rank holds (padding included)."""
        return self.local_lens[self.cp_rank]

    def token_index(self, cp_rank: Optional[int] = None) -> torch.Tensor:
        """Global positions of the real tokens a CP rank holds, in its local order (pads, if any, follow)."""
        return self._real_index[self.cp_rank if cp_rank is None else cp_rank]

    def position_ids(self, cp_rank: Optional[int] = None) -> torch.Tensor:
        """Position of each local token inside its own document (pads get 0), e.g. for RoPE."""
        cr = self.cp_rank if cp_rank is None else cp_rank
        full = torch.cat([torch.arange(n) for n in self.seq_lens])
        pos = full[self.token_index(cr)]
        pad = self.local_lens[cr] - pos.numel()
        return torch.cat([pos, pos.new_zeros(pad)]) if pad else pos

    def ring_pad_layout(self, ring_rank: int) -> Tuple[List[int], List[int]]:
        """Per Ulysses rank of a ring: (real tokens, local length incl. pads) as they arrive in the all-to-all."""
        U, R = self.ulysses_size, self.ring_size
        crs = [cp_rank_of(ring_rank, u, U, R, self.ring_first) for u in range(U)]
        return [self.real_lens[c] for c in crs], [self.local_lens[c] for c in crs]

    def owners(self) -> torch.Tensor:
        """[total_len] the CP rank that holds each token."""
        owner_of = torch.empty(self.total_len, dtype=torch.long)
        for r in range(self.cp_size):
            owner_of[self.token_index(r)] = r
        return owner_of

    # ------------------------------------------------------------------------------------------------
    # Index tensors on the compute device
    # ------------------------------------------------------------------------------------------------
    def on_device(self, name: str, device, build) -> torch.Tensor:
        """The layout-owned copy on `device` of the host index tensor `build()` (built and copied once).

        `to(device)` (parallel.sharding.SequencePlan) fills these before a step, so the step's forward and backward
        only look them up; an entry missing there is built and copied on first use (the standalone API, which pays a
        host copy then).
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

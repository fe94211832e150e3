"""What every checkpoint reader offers the writers and the loader: the record and canonical tensors, one at a time.

    Source                   base class: .record, .format, .path, canonical(key), canonical_layer(key, layer),
                             dtype(key), nbytes(), close()
    check_layout(record, tp, pp)      every way a TP x PP layout does not divide the model, in one error
    Repadded(source, rows)   a source whose vocabulary tables are padded (or trimmed) to `rows`
    problems_error(what, missing, unexpected, misshaped)   one error listing every tensor that does not fit
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.record import ModelRecord
from .mappings import canonical_specs, LLM, TensorSpec
from ..errors import ConversionError

__all__ = ["Source", "check_layout", "Repadded", "problems_error", "VOCAB_KEYS"]

VOCAB_KEYS = (LLM + "embedding.word_embeddings.weight", LLM + "output_layer.weight")
"""Canonical tensors whose rows are the (padded) vocabulary."""


class Source:
    """A checkpoint opened for reading (see the module docstring). Subclasses set record/format/path and implement
    `canonical` (and `dtype` when tensors differ in dtype)."""

    format: str = "?"
    path: str = ""
    record: ModelRecord

    def specs(self) -> List[TensorSpec]:
        return canonical_specs(self.record)

    def canonical(self, key: str) -> torch.Tensor:
        """The whole canonical tensor `key` (stacked over layers where it is a layer parameter); a fresh tensor the
        caller owns."""
        raise NotImplementedError

    def canonical_layer(self, key: str, layer: int) -> torch.Tensor:
        """Layer `layer` of the stacked canonical tensor `key`."""
        return self.canonical(key)[layer]

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of every canonical tensor in its stored dtype (the size of the checkpoint's weights)."""
        total = 0
        for s in self.specs():
            n = 1
            for d in s.shape:
                n *= d
            total += n * torch.empty((), dtype=self.dtype(s.key)).element_size()
        return total

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_shapes(what: str, want: dict, have: dict) -> None:
    """Raise one ConversionError naming every tensor of `want` ({(component, name): shape}) that `have` lacks, has
    extra, or has in another shape."""
    missing = [f"{c}/{n} {list(s)}" for (c, n), s in sorted(want.items()) if (c, n) not in have]
    unexpected = [f"{c}/{n} {list(s)}" for (c, n), s in sorted(have.items()) if (c, n) not in want]
    misshaped = [f"{c}/{n}: {list(have[(c, n)])}, the configs say {list(s)}" for (c, n), s in sorted(want.items())
                 if (c, n) in have and tuple(have[(c, n)]) != tuple(s)]
    err = problems_error(what, missing, unexpected, misshaped)
    if err is not None:
        raise err


def problems_error(what: str, missing: Sequence[str], unexpected: Sequence[str],
                   misshaped: Sequence[str], hint: str = "") -> Optional[ConversionError]:
    """One error naming every missing, unexpected and misshaped tensor of `what` (None when all fit)."""
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{what} does not match the model its configs describe:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
        if items:
            lines.append(f"  {len(items)} {label}:")
            lines += [f"    {x}" for x in items]
    if hint:
        lines.append(hint)
    return ConversionError("\n".join(lines))


def check_layout(record: ModelRecord, tp: int, pp: int, where: str = "") -> None:
    """Raise one ConversionError listing every way TP x PP does not divide the model."""
    v = record.vision_config()
    llm = record.llm
    bad = []

    def need(value: int, by: int, what: str, flag: str):
        if value % by:
            bad.append(f"{what} {value} is not a multiple of {flag} {by}")

    tpf, ppf = "--tensor-model-parallel-size", "--pipeline-model-parallel-size"
    need(int(llm["num_attention_heads"]), tp, "LLM attention heads", tpf)
    need(int(llm["num_query_groups"]), tp, "LLM key/value heads (query groups)", tpf)
    need(int(llm["ffn_hidden_size"]), tp, "LLM MLP width", tpf)
    need(int(llm["hidden_size"]), tp, "LLM hidden size (the projector's width)", tpf)
    need(int(record.padded_vocab_size), tp, "padded vocabulary", tpf)
    need(v.num_attention_heads, tp, "vision attention heads", tpf)
    need(v.ffn_hidden_size, tp, "vision MLP width", tpf)
    need(int(llm["num_layers"]), pp, "LLM layers", ppf)
    if bad:
        raise ConversionError(f"{where}TP {tp} x PP {pp} does not divide the model: " + "; ".join(bad))


class Repadded(Source):
    """`source` with its vocabulary tables padded with zero rows (or trimmed to the stored vocabulary) to `rows`."""

    def __init__(self, source: Source, rows: int):
        real = int(source.record.llm["vocab_size"])
        if rows < real:
            raise ConversionError(f"cannot pad the vocabulary to {rows} rows: it has {real} real tokens")
        self.inner = source
        self.format, self.path = source.format, source.path
        self.record = copy.copy(source.record)
        self.record.padded_vocab_size = int(rows)

    def canonical(self, key: str) -> torch.Tensor:
        t = self.inner.canonical(key)
        if key not in VOCAB_KEYS:
            return t
        rows = int(self.record.padded_vocab_size)
        if t.shape[0] >= rows:
            return t[:rows].clone() if t.shape[0] > rows else t
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

    def canonical_layer(self, key: str, layer: int) -> torch.Tensor:
        return self.inner.canonical_layer(key, layer)

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(key)

    def close(self) -> None:
        self.inner.close()


def specs_table(record: ModelRecord) -> Dict[str, Tuple[int, ...]]:
    return {s.key: s.shape for s in canonical_specs(record)}

"""This project's Megatron-Core checkpoints (torch_dist + model record), read and written without a model.

Layout (Megatron-LM's, as `checkpoint.distributed.save_checkpoint` writes it):
    <root>/latest_checkpointed_iteration.txt        "0" for a conversion
    <root>/iter_0000000/.metadata, __0_0.distcp     torch_dist: every canonical tensor whole (global shape)
    <root>/iter_0000000/metadata.json, common.pt    megatron's backend tag; iteration / layout / train state
    <root>/iter_0000000/model_record.json           the model (models.record), with model_assets/ beside it

torch_dist stores global tensors, so the layout given to a conversion (TP x PP) only chooses the vocabulary
padding (a multiple of make-vocab-size-divisible-by x TP), is checked to divide the model, and is recorded as
the default; megatron-core loads the checkpoint into any layout that divides it. The `_extra_state` objects of the
local spec's linear layers (None) are written under Megatron's keys so `dist_checkpointing.load` finds every key
the model asks for.

    MCoreSource(path)          a project checkpoint (root with the tracker, or an iter_N folder) as a Source
    write_mcore(source, root, tp, pp, ...)
    is_mcore(path)
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch

from ..checkpoint.layout import TRACKER, iteration_folder, write_tracker
from ..errors import CheckpointError, ConversionError
from ..models.record import ModelRecord, read_model_record, write_model_record
from .mappings import canonical_specs, extra_state_keys, LLM, padded_vocab_size, PROJ, VISION
from .source import Repadded, Source, check_layout, problems_error
from .storage import DcpReader, write_dcp

__all__ = ["MCoreSource", "write_mcore", "is_mcore", "resolve_iteration_dir", "rows_needed", "for_layout", "laid_out",
           "MODEL_PREFIXES"]

MODEL_PREFIXES = (VISION, PROJ, LLM)
"""Prefixes of the model's tensors inside a project checkpoint (the optimizer's live elsewhere)."""


def resolve_iteration_dir(path: str) -> Optional[str]:
    """The iteration folder of a project checkpoint (checkpoint.layout.iteration_folder), refusals as
    ConversionError."""
    try:
        return iteration_folder(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def is_mcore(path: str) -> bool:
    try:
        return resolve_iteration_dir(path) is not None
    except ConversionError:
        return True  # a tracker that names nothing: still this format, MCoreSource says what is wrong


def rows_needed(record: ModelRecord) -> int:
    """Rows the vocabulary tables need: the stored tokens and every placeholder id the tokenizer facts name."""
    tok = record.tokenizer
    ids = [int(record.llm["vocab_size"]), int(tok.get("vocab_size") or 0)]
    ids += [int(tok[k]) + 1 for k in ("media_token_id", "video_token_id", "sentinel_token_id")
            if tok.get(k) is not None]
    return max(ids)


def for_layout(source: Source, tp: int, pp: int, divisible_by: int) -> Source:
    """`source` with its vocabulary padded for TP (re-padded when its padding does not divide), layout checked."""
    rows = int(source.record.padded_vocab_size)
    if rows % (divisible_by * tp) or rows < rows_needed(source.record):
        source = Repadded(source, padded_vocab_size(rows_needed(source.record), divisible_by, tp))
    check_layout(source.record, tp, pp, f"{source.path}: ")
    return source


def laid_out(source: Source, tp: int, pp: int, divisible_by: int):
    """(`for_layout(source, ...)`, a copy of its record whose default_layout is this TP x PP): what a writer saves."""
    source = for_layout(source, tp, pp, divisible_by)
    record = copy.copy(source.record)
    record.default_layout = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                             "make_vocab_size_divisible_by": divisible_by}
    return source, record


class MCoreSource(Source):
    """A project torch_dist checkpoint as canonical tensors; the model comes from its model_record.json."""

    format = "mcore"

    def __init__(self, path: str):
        self.path = path
        d = resolve_iteration_dir(path)
        if d is None:
            raise ConversionError(f"{path}: not a torch_dist checkpoint of this project (no {TRACKER} and no "
                                  f".metadata)")
        self.iter_dir = d
        record = read_model_record(d)
        if record is None:
            raise ConversionError(f"{d}: no model_record.json, so the model's shape is unknown (the checkpoint was "
                                  f"saved before records existed); load it with the flags it was trained with and "
                                  f"save it again")
        self.record = record
        self.reader = DcpReader(d)
        want = {s.key: s.shape for s in canonical_specs(record)}
        have = {k: v[0] for k, v in self.reader.tensors.items() if k.startswith(MODEL_PREFIXES)}
        err = problems_error(
            d, [f"{k} {list(s)}" for k, s in sorted(want.items()) if k not in have],
            [f"{k} {list(s)}" for k, s in sorted(have.items()) if k not in want],
            [f"{k}: {list(have[k])}, the record says {list(s)}" for k, s in sorted(want.items())
             if k in have and tuple(have[k]) != tuple(s)])
        if err is not None:
            raise err

    def canonical(self, key: str) -> torch.Tensor:
        return self.reader.read(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.tensors[key][1]


def write_common(iter_dir: str, record: ModelRecord, source: Source, layout: dict) -> None:
    """megatron's common.pt (what checkpoint.distributed.load_checkpoint reads for a weights-only load)."""
    train_state = {"converted_from": source.path, "source_format": source.format}
    torch.save({"iteration": 0, "format_version": 1, "layout": dict(layout), "train_state": train_state,
                "scheduler": None}, os.path.join(iter_dir, "common.pt"))
    with open(os.path.join(iter_dir, "train_state.json"), "w") as f:
        json.dump({"iteration": 0, "layout": layout, **train_state}, f, indent=1)


def write_mcore(source: Source, root: str, *, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                dtype: Optional[torch.dtype] = None, progress=None, hooks=None) -> ModelRecord:
    """Write `source` as a project checkpoint under `root` (module docstring); returns the record written."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    source, record = laid_out(source, tp, pp, make_vocab_size_divisible_by)
    iter_dir = os.path.join(root, "iter_0000000")
    specs = [(s.key, s.shape, dtype if dtype is not None else source.dtype(s.key)) for s in canonical_specs(record)]
    out_dtype = {k: d for k, _, d in specs}

    def produce(key):
        t = source.canonical(key)
        return t.to(out_dtype[key]) if t.dtype != out_dtype[key] else t

    def written(key, nbytes):
        if progress is not None:
            progress.update(nbytes, key)
        if hooks and "after_tensor" in hooks:
            hooks["after_tensor"](key)

    write_dcp(iter_dir, specs, produce, extra_state_keys(record), on_written=written)
    layout = {"tp": tp, "pp": pp, "cp": 1, "dp": 1, "world_size": tp * pp}
    write_common(iter_dir, record, source, layout)
    write_model_record(iter_dir, record)
    write_tracker(root, 0)
    return record

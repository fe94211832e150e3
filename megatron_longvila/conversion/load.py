"""Checkpoints of any format into a LongVILA model for this rank's Megatron parallel state.

    detect_format(path) -> "hf" | "mcore" | "nemo"
    open_source(path, fmt=None, ...) -> Source          (or the base-model pair with llm= and vision_tower=)
    read_record(path, ...) -> ModelRecord               the model a checkpoint of any format describes
    load_longvila(path, *, params_dtype=torch.float32, ...) -> LongVILAModel     (the public contract)
    load_weights(model, path, ..., stats=None)           weights of any format into a built model (any TP x PP)
    read_bytes(src) -> {"header_bytes", "data_bytes"}    what a Hugging Face source has read from its files
    load_pretrained(path, model) -> LoadedCheckpoint    what the training loop's --pretrained-checkpoint calls
    apply_record(model, record, ...)                    the record's token order and RoPE scaling on a built model

How weights reach a rank: project and NeMo checkpoints through megatron-core's `dist_checkpointing.load` (each rank
reads its own shards; NeMo's keys renamed on the model's sharded state dict); Hugging Face folders by filling the
model's sharded state dict directly, each rank reading only the bytes of its own slices: for every shard, which row
of which HF tensor each of its rows comes from (found by running the mapping, mappings.hf_to_canonical, on row
numbers instead of weights: QKV interleaving, gate/up concatenation and vocabulary padding included), then each run
of consecutive rows read at its safetensors offset in one read, or row by row for a column range (row-parallel
layers); padding rows are zeros, not read. A rank reads its slices, the tensors it replicates and the files'
headers (`stats=` reports the bytes). Either way the final `load_state_dict(strict=True)` proves every parameter
and kept buffer was loaded.
"""

from __future__ import annotations

import copy
import os
from typing import Optional, Sequence

import torch

from ..checkpoint.distributed import LoadedCheckpoint, load_checkpoint
from ..checkpoint.layout import TRACKER, read_tracker
from ..errors import ArgumentError, ConversionError
from ..models.record import ModelRecord
from ..models.registry import build_longvila
from .hf_base import HFBaseSource
from .hf_vila import HFVilaSource, is_hf_vila
from .mappings import PROJ, hf_to_canonical
from .mcore import MCoreSource, is_mcore
from .nemo import NeMoSource, is_nemo, to_nemo_key
from .source import VOCAB_KEYS, Repadded, Source, check_layout

__all__ = ["detect_format", "open_source", "read_record", "load_longvila", "load_weights", "load_pretrained",
           "apply_record", "read_bytes", "FORMATS"]

FORMATS = ("hf", "mcore", "nemo")
"""Checkpoint formats: Hugging Face VILA, this project's torch_dist, NeMo 2."""


def detect_format(path: str) -> str:
    """The format of the checkpoint folder `path` (raise naming what was looked for)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such folder")
    if is_nemo(path):
        return "nemo"
    if is_mcore(path):
        return "mcore"
    if is_hf_vila(path):
        return "hf"
    raise ConversionError(f"{path}: not a checkpoint this project reads: expected a Hugging Face VILA folder "
                          f"(config.json, llm/, vision_tower/, mm_projector/), a project torch_dist checkpoint "
                          f"(latest_checkpointed_iteration.txt or an iter_N folder) or NeMo 2 (context/, weights/); "
                          f"for base models give --llm DIR --vision-tower DIR")


def open_source(path: Optional[str] = None, fmt: Optional[str] = None, *, llm: Optional[str] = None,
                vision_tower: Optional[str] = None, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                token_order: Optional[str] = None, seed: int = 0) -> Source:
    """Open a checkpoint for reading (see the module docstring); `token_order` overrides the recorded order."""
    tp, pp, div = tensor_model_parallel_size, pipeline_model_parallel_size, make_vocab_size_divisible_by
    if llm is not None or vision_tower is not None:
        if llm is None or vision_tower is None or path is not None:
            raise ConversionError("base models need both --llm DIR and --vision-tower DIR (and no --source)")
        return HFBaseSource(llm, vision_tower, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            make_vocab_size_divisible_by=div, seed=seed,
                            token_order=token_order or "row_major")
    if path is None:
        raise ConversionError("give --source DIR (or --llm DIR --vision-tower DIR for base models)")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConversionError(f"--source-format {fmt}: choose one of {FORMATS}")
    if fmt == "hf":
        return HFVilaSource(path, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            make_vocab_size_divisible_by=div, token_order=token_order)
    src = MCoreSource(path) if fmt == "mcore" else NeMoSource(path)
    if token_order is not None and token_order != src.record.token_order:
        src.record = copy.copy(src.record)
        src.record.source = dict(src.record.source, notes=list(src.record.source.get("notes", [])) + [
            f"token order overridden to {token_order} (recorded: {src.record.token_order})"])
        src.record.token_order = token_order
    return src


def read_record(path: str, fmt: Optional[str] = None, **kwargs) -> ModelRecord:
    """The record of the model the checkpoint at `path` describes (HF: padded for the given layout)."""
    with open_source(path, fmt, **kwargs) as src:
        return src.record


def apply_record(model, record: ModelRecord, *, why: Optional[str] = None) -> None:
    """Give a built LongVILAModel the record's projector token order (announced once) and linear RoPE scaling."""
    if model.projector is not None:
        model.projector.set_token_order(record.token_order, why or "from the checkpoint's model record")
    factor = (record.rope_scaling or {}).get("factor")
    rope = getattr(model.language_model.model, "rotary_pos_emb", None)
    if rope is not None:
        # Megatron divides positions by seq_len_interpolation_factor (transformers' linear RoPE scaling).
        rope.seq_len_interpolation_factor = float(factor) if factor else None
    model.record = record


def _parallel_sizes():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise ConversionError("load_longvila needs megatron.core.parallel_state initialized (initialize_model_parallel"
                              "), as any Megatron model builder does")
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size())


def load_longvila(path: str, *, params_dtype: torch.dtype = torch.float32, source_format: Optional[str] = None,
                  token_order: Optional[str] = None,
                  hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None, use_te: bool = False,
                  llm_overrides: Optional[dict] = None, stats: Optional[dict] = None):
    """Build the LongVILA model the checkpoint at `path` (HF VILA, project torch_dist or NeMo 2) describes, for
    this rank's Megatron parallel state (TP, PP, CP; initialized by the caller), load its weights, return it.

    Its `forward(MicroBatch, mesh, reduction="none")` gives per-token losses as in training. token_order overrides
    the recorded projector order (announced once); llm_overrides go to the LLM's TransformerConfig. `stats` (a
    dict), for Hugging Face sources: filled with this rank's read_bytes.
    """

    tp, pp, cp = _parallel_sizes()
    src = open_source(path, source_format, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      token_order=token_order)
    try:
        record = src.record
        check_layout(record, tp, pp, f"{path}: ")
        model = build_longvila(
            encoder=record.vision_config(), llm=record.llm_shape(), tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, context_parallel_size=cp,
            hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes, params_dtype=params_dtype,
            use_te=use_te, media_token_id=record.tokenizer.get("media_token_id"),
            real_vocab_size=int(record.llm["vocab_size"]), llm_overrides=llm_overrides)
        apply_record(model, record, why=f"{path}'s model record" + (" (overridden)" if token_order else ""))
        _load_into(model, src, path)
        if stats is not None:
            stats.update(read_bytes(src))
    finally:
        src.close()
    return model


def load_weights(model, path: str, *, source_format: Optional[str] = None, stats: Optional[dict] = None) -> Source:
    """Load the weights of the checkpoint at `path` into a built LongVILA model of the same shape (any TP x PP).
    `stats` (a dict), for Hugging Face sources: filled with this rank's read_bytes."""
    tp, pp, _ = _parallel_sizes()
    rows = model.record.padded_vocab_size if getattr(model, "record", None) is not None else None
    div = (model.record.default_layout or {}).get("make_vocab_size_divisible_by", 128) if rows else 128
    src = open_source(path, source_format, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      make_vocab_size_divisible_by=div)
    try:
        if rows is not None and int(src.record.padded_vocab_size) != int(rows):
            src = Repadded(src, int(rows))
        _load_into(model, src, path)
        if stats is not None:
            stats.update(read_bytes(src))
    finally:
        src.close()
    return src


def _load_into(model, src: Source, path: str) -> None:
    if _hf_of(src) is not None:
        _fill_sliced(model, src)
    elif isinstance(src, Repadded) or src.format in ("hf", "hf_base"):
        _fill_from_source(model, src)
    elif src.format == "mcore":
        _load_dist(model, src.iter_dir, rename=None)
    else:
        _load_dist(model, os.path.join(src.path, "weights"), rename=to_nemo_key)


def _load_dist(model, ckpt_dir: str, rename) -> None:
    """megatron-core's load of the model's sharded state dict from `ckpt_dir`, keys renamed by `rename` (None for
    what the checkpoint has no slot for: those keep the model's own value)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    sd = model.sharded_state_dict()
    kept = {}
    if rename is not None:
        for k in list(sd):
            v = sd[k]
            if isinstance(v, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
                new = rename(v.key)
                if new is None:
                    kept[k] = v.data
                    del sd[k]
                else:
                    v.key = new
    # Nested under "model" as checkpoint.distributed saves it: the common state (iteration, ...) stays beside it.
    loaded = dist_checkpointing.load({"model": sd}, ckpt_dir)["model"]
    loaded.update(kept)
    model.load_state_dict(loaded, strict=True)


def _hf_of(src: Source):
    """The Hugging Face source `src` is (or pads: Repadded), else None."""
    inner = src.inner if isinstance(src, Repadded) else src
    return inner if isinstance(inner, (HFVilaSource, HFBaseSource)) else None


def read_bytes(src: Source) -> dict:
    """Bytes read so far from a Hugging Face source's safetensors files: {"header_bytes", "data_bytes"} (headers:
    the 8-byte length and the JSON of every file, read when the source opens). Other formats: {}."""
    hf = _hf_of(src)
    if hf is None:
        return {}
    files = [sf for w in hf.weights.values() for sf in w.files.values()]
    header = sum(sf.data_start for sf in files)
    return {"header_bytes": header, "data_bytes": sum(sf.bytes_read for sf in files) - header}


_ROW_BITS = 40  # row provenance: (index of the HF tensor << 40) | (row + 1); 0 is a padding row


def _row_sources(src: Source, hf, key: str, layer: Optional[int]):
    """Which row of which HF tensor each row of the canonical tensor `key` (its layer `layer`) is: the mapping run
    on row numbers (int64, one per HF row) instead of weights. Returns (a list of codes, [(component, name)])."""
    names = []

    def rows_of(component: str, name: str) -> torch.Tensor:
        shape = hf.weights[component].shape(name)
        if not shape:
            raise ConversionError(f"{hf.path}: {component}/{name} is a scalar; the model has no such tensor")
        names.append((component, name))
        return torch.arange(1, shape[0] + 1, dtype=torch.int64) + ((len(names) - 1) << _ROW_BITS)

    prefix = hf.record.hf.get("vision_key_prefix", "vision_model.")
    codes = hf_to_canonical(hf.record, key, rows_of, layer, vision_prefix=prefix)
    if codes.dim() != 1:
        raise ConversionError(f"{hf.path}: {key} reached the sliced reader as a whole layer stack; a layer "
                              f"parameter's shards carry their layer (prepend_axis_num)")
    if src is not hf and key in VOCAB_KEYS:  # Repadded: the vocabulary tables padded (or trimmed) to its rows
        rows = int(src.record.padded_vocab_size)
        codes = codes[:rows] if codes.shape[0] >= rows else torch.cat([codes, codes.new_zeros(rows - codes.shape[0])])
    return codes.tolist(), names


def _read_shard(src: Source, hf, sh) -> None:
    """Fill one ShardedTensor's local data from the HF files, reading only its rows (and its columns, row by row)."""
    p = sh.prepend_axis_num
    layer = sh.global_offset[0] if p else None
    full, off, local = tuple(sh.global_shape[p:]), tuple(sh.global_offset[p:]), tuple(sh.local_shape)
    dst = sh.data
    if isinstance(hf, HFBaseSource) and sh.key.startswith(PROJ):  # drawn from the seed, not stored: nothing to read
        t = src.canonical(sh.key)
        dst.copy_(t[tuple(slice(o, o + n) for o, n in zip(off, local))])
        return
    codes, names = _row_sources(src, hf, sh.key, layer)
    if len(codes) != full[0]:
        raise ConversionError(f"{hf.path}: {sh.key} has {len(codes)} rows, the model has {list(full)}")
    cols = None
    if len(full) >= 2 and (off[1] != 0 or local[1] != full[1]):
        cols = (off[1], off[1] + local[1])
    rest = tuple(slice(o, o + n) for o, n in zip(off[2:], local[2:]))
    rows = codes[off[0]:off[0] + local[0]]
    mask = (1 << _ROW_BITS) - 1
    i = 0
    while i < len(rows):
        j = i + 1
        if rows[i] == 0:
            while j < len(rows) and rows[j] == 0:
                j += 1
            dst[i:j].zero_()
        else:
            while j < len(rows) and rows[j] == rows[j - 1] + 1 and rows[j] >> _ROW_BITS == rows[i] >> _ROW_BITS:
                j += 1
            component, name = names[rows[i] >> _ROW_BITS]
            weights = hf.weights[component]
            fname, stored = weights.where[name]
            start = (rows[i] & mask) - 1
            block = weights.files[fname].read_rows(stored, start, start + j - i, cols)
            if rest:
                block = block[(slice(None), slice(None)) + rest]
            if tuple(block.shape) != tuple(dst[i:j].shape):
                raise ConversionError(f"{hf.path}: {component}/{name} rows {start}:{start + j - i} are "
                                      f"{list(block.shape)}, {sh.key}'s shard needs {list(dst[i:j].shape)}")
            dst[i:j].copy_(block)
        i = j


def _fill_sliced(model, src: Source) -> None:
    """Every ShardedTensor of the model read from the HF files at its own byte ranges, then loaded strictly."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    hf = _hf_of(src)
    sd, _, factories = load_preprocess(model.sharded_state_dict())
    with torch.no_grad():
        for sh in nested_values(sd):
            if isinstance(sh, ShardedTensor):
                if sh.flattened_range is not None:
                    raise ConversionError(f"{sh.key}: a flattened shard (distributed optimizer state) is not a "
                                          f"model parameter; the HF reader fills model parameters")
                _read_shard(src, hf, sh)
    state = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedBase) else x, sd)
    state = apply_factory_merges(state, factories)
    model.load_state_dict(state, strict=True)


def _fill_from_source(model, src: Source) -> None:
    """Copy this rank's slice of every canonical tensor into the model's sharded state dict, then load it."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sd, _, factories = load_preprocess(model.sharded_state_dict())
    cache = {}
    with torch.no_grad():
        for sh in nested_values(sd):
            if not isinstance(sh, ShardedTensor):
                continue
            p = sh.prepend_axis_num
            ck = (sh.key, sh.global_offset[0] if p else None)
            if ck not in cache:
                cache.clear()  # consumers of one canonical tensor come together; keep memory to one tensor
                cache[ck] = src.canonical_layer(sh.key, ck[1]) if p else src.canonical(sh.key)
            full = cache[ck]
            if tuple(full.shape) != tuple(sh.global_shape[p:]):
                raise ConversionError(f"{src.path}: {sh.key} is {list(full.shape)}, the model has "
                                      f"{list(sh.global_shape[p:])}")
            idx = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
            sh.data.copy_(full[idx])
    cache.clear()
    state = dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedBase) else x, sd)
    state = apply_factory_merges(state, factories)
    model.load_state_dict(state, strict=True)


def load_pretrained(path: str, model):
    """--pretrained-checkpoint PATH of any format into the training run's model (weights only, iteration 0).

    A project checkpoint with a tracker goes through checkpoint.distributed.load_checkpoint as before; Hugging Face
    VILA folders, NeMo checkpoints and bare iteration folders through load_weights.
    """
    if os.path.isdir(path) and read_tracker(path) is not None:
        return load_checkpoint(path, model)
    try:
        fmt = detect_format(path)
    except ConversionError as e:
        raise ArgumentError(f"--pretrained-checkpoint {path}: no {TRACKER} there (the previous stage has not "
                            f"saved a checkpoint), and not a converted checkpoint: {e}") from None
    src = load_weights(model, path, source_format=fmt)
    return LoadedCheckpoint(iteration=0, train_state={"converted_from": path, "format": fmt}, data_state=None,
                                 rng_restored=False, layout=dict(src.record.default_layout))


"""Checkpoints of any format into a LongVILA model for this rank's Megatron parallel state.

    detect_format(path) -> "hf" | "mcore" | "nemo"
    open_source(path, fmt=None, ...) -> Source          (or the base-model pair with llm= and vision_tower=)
    read_record(path, ...) -> ModelRecord               the model a checkpoint of any format describes
    load_longvila(path, *, params_dtype=torch.float32, ...) -> LongVILAModel     (the public contract)
    load_weights(model, path, ...)                       weights of any format into a built model (any TP x PP)
    load_pretrained(path, model) -> LoadedCheckpoint    what the training loop's --pretrained-checkpoint calls
    apply_record(model, record, ...)                    the record's token order and RoPE scaling on a built model

How weights reach a rank: project and NeMo checkpoints through megatron-core's `dist_checkpointing.load` (each rank
reads its own shards; NeMo's keys renamed on the model's sharded state dict); Hugging Face folders by filling the
model's sharded state dict directly: every rank reads, per layer, the HF tensors its shards come from, builds the
canonical tensor (mappings) and copies its slice. Either way the final `load_state_dict(strict=True)` proves
every parameter and kept buffer was loaded.
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
from .mcore import MCoreSource, is_mcore
from .nemo import NeMoSource, is_nemo, to_nemo_key
from .source import Repadded, Source, check_layout

__all__ = ["detect_format", "open_source", "read_record", "load_longvila", "load_weights", "load_pretrained",
           "apply_record", "FORMATS"]

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
                  llm_overrides: Optional[dict] = None):
    """Build the LongVILA model the checkpoint at `path` (HF VILA, project torch_dist or NeMo 2) describes, for
    this rank's Megatron parallel state (TP, PP, CP; initialized by the caller), load its weights, return it.

    Its `forward(MicroBatch, mesh, reduction="none")` gives per-token losses as in training. token_order overrides
    the recorded projector order (announced once); llm_overrides go to the LLM's TransformerConfig.
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
    finally:
        src.close()
    return model


def load_weights(model, path: str, *, source_format: Optional[str] = None) -> Source:
    """Load the weights of the checkpoint at `path` into a built LongVILA model of the same shape (any TP x PP)."""
    tp, pp, _ = _parallel_sizes()
    rows = model.record.padded_vocab_size if getattr(model, "record", None) is not None else None
    div = (model.record.default_layout or {}).get("make_vocab_size_divisible_by", 128) if rows else 128
    src = open_source(path, source_format, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      make_vocab_size_divisible_by=div)
    try:
        if rows is not None and int(src.record.padded_vocab_size) != int(rows):
            src = Repadded(src, int(rows))
        _load_into(model, src, path)
    finally:
        src.close()
    return src


def _load_into(model, src: Source, path: str) -> None:
    if isinstance(src, Repadded) or src.format in ("hf", "hf_base"):
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


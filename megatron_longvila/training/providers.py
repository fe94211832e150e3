"""What Megatron-style providers do for LongVILA, from parsed arguments: the model, the data streams, the step.

The example script's `model_provider`, `train_valid_test_datasets_provider` and `forward_step` are thin
wrappers of these, and they run the same under the project's loop and under megatron.training.

    checkpoint_to_load(args) -> (iteration dir, why) | (None, None)   what a run will load (--load, else
                                                                       --pretrained-checkpoint)
    resolve_model_record(args, tokenizer) -> ModelRecord    this run's model: flags, else the checkpoint's record
    build_model(args, tokenizer, pre_process, post_process) -> LongVILAModel   (MM-SP initialized, frozen per
                                                                                the recipe, `.record` attached)
    build_step(args, model, tokenizer) -> LongVILAStep
    build_streams(args, tokenizer, step, dp_rank, dp_size) -> (train, valid, test)   PlannedStream objects

Model flags and checkpoints: --llm and --vision-encoder name registry entries; when the run loads a checkpoint
that carries a model record, they default to the checkpoint's model, and flags given explicitly must describe
the same shapes (a difference is an error naming both values). --pretrained-checkpoint also takes a converted
checkpoint's folder of any format (a Hugging Face VILA folder, a NeMo 2 checkpoint, a project iteration folder:
megatron_longvila.conversion), at any TP/PP that divides the model: its record gives the shapes, the SigLIP layer
that feeds the projector, the projector's token order and the RoPE scaling, and its conversion facts (media,
VILA's files for the way back) travel into every checkpoint the run saves. RoPE: an explicit --rotary-base wins, then a
recipe that extends the context (it declares the change), then the checkpoint's, then the recipe's, then the
LLM's own base; a change against the checkpoint is logged once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional, Tuple

from ..checkpoint.layout import committed_folder, read_tracker
from ..conversion import apply_record, detect_format, read_record
from ..data.dataset import DataConfig, PackedIterator, VideoTextDataset
from ..data.energon import ShardSource
from ..data.tokenizer import FRAME_SEP_TOKEN, IMAGE_TOKEN
from ..config import mmsp_config_from_megatron
from ..errors import ArgumentError, ConversionError
from ..models.freezing import apply_freezing
from ..models.offload import activation_memory_from_args
from ..models.record import (ModelRecord, compare_records, media_settings, read_model_record, record_of,
                             training_media)
from ..models.registry import ENCODERS, LLMS, build_longvila, lookup
from ..parallel.state import initialize_mmsp, mmsp_state
from ..plan.frames import tokens_per_frame
from ..runtime.entry import once
from ..runtime.modules import unwrap_model
from ..runtime.probes import te_available
from .model_flags import ResolvedModel, given_model_flags, resolve_model
from .data_feed import FeedConfig, StepFeed
from .step import LongVILAStep, StepConfig

__all__ = ["checkpoint_to_load", "resolve_model_record", "build_model", "build_step", "build_streams",
           "PlannedStream", "DEFAULT_LLM", "DEFAULT_VISION_ENCODER"]

logger = logging.getLogger("megatron_longvila.training")

DEFAULT_LLM = "qwen2_7b"
"""--llm when neither the flag nor a loaded checkpoint says (LongVILA's Qwen2-7B)."""
DEFAULT_VISION_ENCODER = "siglip_so400m_patch14_384"
"""--vision-encoder when neither the flag nor a loaded checkpoint says."""


def checkpoint_to_load(args) -> Tuple[Optional[str], Optional[str]]:
    """The iteration directory this run loads and why ("--load" resumes, "--pretrained-checkpoint" starts a stage
    from weights), or (None, None)."""
    load = getattr(args, "load", None)
    if load and os.path.isdir(load) and read_tracker(load) is not None:
        return committed_folder(load, read_tracker(load)), "--load"
    pre = getattr(args, "pretrained_checkpoint", None)
    if pre and os.path.isdir(pre) and read_tracker(pre) is not None:
        return committed_folder(pre, read_tracker(pre)), "--pretrained-checkpoint"
    if pre and os.path.isdir(pre):
        try:
            detect_format(pre)  # HF VILA, NeMo 2, or a bare iteration folder
        except ConversionError:
            return None, None
        return pre, "--pretrained-checkpoint"
    return None, None


def _saved_record(path: str, args) -> Optional[ModelRecord]:
    """The record of the checkpoint at `path`: its model_record.json, else (a converted format) the conversion's."""
    if os.path.isfile(os.path.join(path, "model_record.json")) or os.path.isfile(os.path.join(path, "metadata.json")):
        return read_model_record(path)
    return read_record(path, tensor_model_parallel_size=args.tensor_model_parallel_size,
                       pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def _tokenizer_facts(tokenizer, template: Optional[str]) -> dict:
    def special(tok):
        try:
            return tokenizer.token_id(tok)
        except KeyError:
            return None

    kind = {"ByteTokenizer": "bytes", "SentencePieceTokenizer": "sentencepiece", "HFTokenizerFile": "tokenizer.json"}
    return {"vocab_size": int(tokenizer.vocab_size), "kind": kind.get(type(tokenizer).__name__),
            "media_token_id": special(IMAGE_TOKEN),
            "frame_separator_id": special(FRAME_SEP_TOKEN), "pad_id": getattr(tokenizer, "pad_id", None),
            "eos_id": getattr(tokenizer, "eos_id", None), "bos_id": getattr(tokenizer, "bos_id", None),
            "template": template}


def checkpoint_record(args) -> Optional[ModelRecord]:
    """The record of the checkpoint this run loads (any format), or None."""
    path, _ = checkpoint_to_load(args)
    if path is None:
        pre = getattr(args, "pretrained_checkpoint", None)
        if pre and os.path.isdir(pre):
            try:
                return read_record(pre)
            except Exception:  # not a format conversion reads: build_model reports it with the flag's name
                return None
        return None
    return read_model_record(path)


def resolve_model_record(args, tokenizer) -> ModelRecord:
    """The record of the model this run builds (see the module docstring); compares it with the checkpoint's."""
    path, why = checkpoint_to_load(args)
    saved = _saved_record(path, args) if path else None
    if path and saved is None:
        logger.warning("%s has no model record (saved before records existed): the model is built from the flags",
                       path)
    llm_name = getattr(args, "llm", None)
    vision_name = getattr(args, "vision_encoder", None)
    if llm_name is not None or saved is None:
        shape = lookup(LLMS, llm_name or DEFAULT_LLM, "LLM shape (--llm)")
        real_vocab = max(shape.vocab_size, tokenizer.vocab_size)
        unit = args.make_vocab_size_divisible_by
        padded = -(-real_vocab // unit) * unit
        base_theta = shape.rotary_base
        llm_name = llm_name or DEFAULT_LLM
    else:
        shape = saved.llm_shape()
        real_vocab, padded = int(saved.llm["vocab_size"]), int(saved.padded_vocab_size)
        base_theta = saved.rope_theta
        llm_name = saved.registry_names.get("llm")
    if vision_name is not None or saved is None:
        vision = lookup(ENCODERS, vision_name or DEFAULT_VISION_ENCODER, "vision encoder (--vision-encoder)")
        vision_name = vision_name or DEFAULT_VISION_ENCODER
    else:
        vision = saved.vision_config()
        vision_name = saved.registry_names.get("vision")

    explicit = getattr(args, "rotary_base_explicit", None)
    recipe_theta = getattr(args, "recipe_rotary_base", None)
    extends = bool(getattr(args, "recipe_changes_rope", False))
    if explicit is not None:
        theta, rope_change = explicit, "--rotary-base"
    elif extends and recipe_theta is not None:
        theta, rope_change = recipe_theta, f"--recipe {args.recipe} extends the context"
    elif saved is not None:
        theta, rope_change = saved.rope_theta, None
    elif recipe_theta is not None:
        theta, rope_change = recipe_theta, None
    else:
        theta, rope_change = base_theta, None
    rope_scaling = saved.rope_scaling if (saved is not None and rope_change is None) else None
    shape = replace(shape, vocab_size=padded, rotary_base=theta,
                    max_position_embeddings=max(shape.max_position_embeddings, int(args.seq_length)))
    # What the checkpoint says beyond shapes (converted checkpoints: token order, media, VILA's files for the way
    # back) carries over, so every checkpoint this run saves still says it.
    carried = {}
    if saved is not None:
        carried = dict(llm_type=saved.llm_type, token_order=saved.token_order,
                       projector_epsilon=float(saved.projector.get("layernorm_epsilon", 1e-5)), media=saved.media,
                       default_layout=saved.default_layout, source=saved.source, hf=saved.hf, assets=saved.assets)
    facts = _tokenizer_facts(tokenizer, getattr(args, "template", None))
    if saved is not None:
        if facts["vocab_size"] > padded:
            raise ValueError(f"--tokenizer-model: the tokenizer has {facts['vocab_size']} tokens, the checkpoint "
                             f"{path}'s embedding holds {padded} rows: use the checkpoint's tokenizer")
        if facts["vocab_size"] > real_vocab:
            logger.warning("tokens %d..%d of this run's tokenizer have no trained rows in %s: they are masked out "
                           "of the softmax like padding (inputs only: as media placeholders their embeddings are "
                           "replaced; a label among them would have infinite loss)", real_vocab,
                           facts["vocab_size"] - 1, path)
        for k in ("chat_template", "sentinel_token_id", "video_token_id"):
            if saved.tokenizer.get(k) is not None:
                facts.setdefault(k, saved.tokenizer[k])
    built = record_of(shape, vision, real_vocab_size=real_vocab, tokenizer=facts, rope_scaling=rope_scaling,
                      registry_names={"llm": llm_name, "vision": vision_name}, **carried)
    if saved is not None:
        for note in compare_records(saved, built, where=f"checkpoint {path} ({why})", rope_change=rope_change):
            logger.warning(note)
    # The media settings this run trains with go into every checkpoint it saves: generation, V-NIAH and conversion
    # take them from there (frames per video above all: a model asked about more or fewer frames answers worse).
    built.media = training_media(built, media_settings(saved if saved is not None else built, args))
    return built


def model_settings(args, record: ModelRecord, *, cuda: bool, te: bool,
                   target_note: Optional[str] = None) -> Tuple[ResolvedModel, dict]:
    """This run's model and kernel flags resolved against the model the record describes (training.model_flags), and
    the keyword arguments of models.registry.longvila_configs / build_longvila that follow: one function for the
    launch and its dry run."""
    import torch

    if args.make_vocab_size_divisible_by % args.tensor_model_parallel_size:
        raise ArgumentError(f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} must be a multiple "
                            f"of --tensor-model-parallel-size {args.tensor_model_parallel_size}")
    shape = record.llm_shape()
    names = record.registry_names or {}
    source = f"--llm {names['llm']}" if names.get("llm") else "the checkpoint's model record"
    # megatron.training's arguments carry the flags their command line gave (training.megatron_flags).
    given = getattr(args, "model_flags_given", None)
    if given is None:
        given = given_model_flags(args)
    resolved = resolve_model(args, shape, given=given, cuda=cuda, te=te, shape_source=source,
                             target_note=target_note)
    if "max_position_embeddings" in given:
        shape = replace(shape, max_position_embeddings=int(args.max_position_embeddings))
    resolved.set("llm", "calculate_per_token_loss", True, "rule: MM-SP's loss is the exact global token mean")
    resolved.set("llm", "sequence_parallel", bool(args.sequence_parallel),
                 "flag --sequence-parallel" if args.sequence_parallel else "default: off")
    resolved.set("llm", "bf16", bool(args.bf16), "flag --bf16" if args.bf16 else "default: fp32")
    if args.context_parallel_size > 1:
        comm = args.cp_comm_type if isinstance(args.cp_comm_type, str) else args.cp_comm_type[0]
        resolved.set("llm", "cp_comm_type", comm, "flag --cp-comm-type (MM-SP: Ulysses x ring)")
    kwargs = dict(encoder=record.vision_config(), llm=shape,
                  tensor_model_parallel_size=args.tensor_model_parallel_size,
                  pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                  context_parallel_size=args.context_parallel_size,
                  hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
                  params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                  llm_overrides=dict(resolved.llm), vision_overrides=dict(resolved.vision),
                  projector_overrides=dict(resolved.projector), activation_memory=activation_memory_from_args(args))
    return resolved, kwargs


def build_model(args, tokenizer, pre_process: bool = True, post_process: bool = True):
    """LongVILA for this rank from the arguments (see the module docstring)."""
    import torch

    # Kept on the model, not on args: Megatron-LM pickles args into its checkpoints.
    record = resolve_model_record(args, tokenizer)
    resolved, kwargs = model_settings(args, record, cuda=torch.cuda.is_available(), te=te_available())
    for note in resolved.notes:
        once(note)
    model = build_longvila(projector=args.projector, use_te=resolved.use_te, pre_process=pre_process,
                           post_process=post_process, media_token_id=record.tokenizer.get("media_token_id"),
                           real_vocab_size=int(record.llm["vocab_size"]), **kwargs)
    model.resolved = resolved  # the loop reads DDP's overlap settings from it
    # The record's projector token order (announced once) and linear RoPE scaling; sets model.record.
    apply_record(model, record)
    initialize_mmsp(model.config, mmsp_config_from_megatron(model.config, attention_backend=resolved.attention_backend),
                    seq_length=args.seq_length, packed=True)
    apply_freezing(model, args.freeze)
    return model


def build_step(args, model, tokenizer) -> LongVILAStep:
    """The step for this rank's model (its MM-SP settings, the tokenizer's pad id, the encoder's frame size)."""
    m = unwrap_model(model)
    state = mmsp_state(m.config)
    record = m.record
    return LongVILAStep(StepConfig(
        seq_length=args.seq_length, pad_id=tokenizer.pad_id, uniform_shards=bool(state.config.uniform_shards),
        pad_to_multiple=state.config.pad_to_multiple, pipeline_parallel=args.pipeline_model_parallel_size > 1,
        image_size=int(record.vision["image_size"]), image_mode=media_settings(record, args)["image_mode"],
        image_mean=media_settings(record, args)["image_mean"], image_std=media_settings(record, args)["image_std"],
        decode_backend=getattr(args, "decode_backend", "auto"),
        max_skip_fraction=getattr(args, "max_skip_fraction", 0.1),
        min_samples_for_skip_check=getattr(args, "min_samples_for_skip_check", 20)), m)


class PlannedStream:
    """A resumable packed-sequence stream whose iterator hands the step planned micro-batches: its StepFeed
    (training.data_feed: one reader per replica, --num-workers producers).

    `state_dict` / `load_state_dict` are the feed's: the resume point after the last step handed out, the steps
    prepared ahead not counted.
    """

    def __init__(self, packed, step: LongVILAStep, num_microbatches, feed: StepFeed):
        self.packed = packed
        self.step = step
        self.num_microbatches = num_microbatches
        self.feed = feed

    def __iter__(self) -> StepFeed:
        return iter(self.feed)  # a producer starts here where there is one

    def state_dict(self) -> dict:
        return self.feed.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.feed.load_state_dict(state)


def _num_microbatches(args, dp_size: int, training: bool):
    """Micro-batches per step: megatron.training's calculator when it runs (batch-size ramp-up), else the flags."""
    fixed = args.global_batch_size // (args.micro_batch_size * dp_size)
    if not training:
        return fixed

    def get() -> int:
        from megatron.core import num_microbatches_calculator as calc

        if getattr(calc, "_GLOBAL_NUM_MICROBATCHES_CALCULATOR", None) is not None:
            return calc.get_num_microbatches()
        return fixed

    return get


def build_streams(args, tokenizer, step: LongVILAStep, dp_rank: int, dp_size: int):
    """(train, valid, test): packed streams from JSONL manifests or webdataset shard folders, one per data-parallel
    replica (resumable)."""
    record = step.model.record
    size, patch = int(record.vision["image_size"]), int(record.vision["patch_size"])
    # The skip fraction is judged by the step over all data-parallel ranks (StepConfig), not per rank here.
    media = media_settings(record, args)
    cfg = DataConfig(template=args.template, tokens_per_frame=tokens_per_frame(size, size, patch),
                     num_frames=media["num_frames"], frame_separator=media["frame_separator"],
                     max_seq_len=args.seq_length, seed=args.seed, max_skip_fraction=1.0,
                     video_backend=getattr(args, "decode_backend", "auto"))

    def stream(path, training):
        # A folder of webdataset .tar shards (or one .tar): every rank indexes them, the reader reads the samples.
        source = ShardSource(path) if os.path.isdir(path) or path.endswith(".tar") else path
        ds = VideoTextDataset(source, tokenizer, cfg, dp_rank=dp_rank, dp_size=dp_size)
        packed = PackedIterator(ds, args.seq_length, loss_weighting=getattr(args, "loss_weighting", "token"))
        # Collective: every rank builds the training stream's feed, then the validation stream's.
        feed = StepFeed(packed, step, _num_microbatches(args, dp_size, training),
                        FeedConfig(num_workers=getattr(args, "num_workers", 0) if training else 0),
                        tag="train" if training else "valid")
        ds.log_skips = feed.is_reader  # the replica's reader is the one rank that reads, so the one that tells
        return PlannedStream(packed, step, _num_microbatches(args, dp_size, training), feed)

    train = stream(args.data_path, True)
    valid = stream(args.valid_data_path, False) if args.valid_data_path else None
    return train, valid, None

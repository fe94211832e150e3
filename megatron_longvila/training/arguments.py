"""Command-line arguments with Megatron's flag names, filled from a stage recipe, checked at start-up.

    build_parser(extra_args_provider=None) -> argparse.ArgumentParser
    parse_args(argv=None, extra_args_provider=None) -> argparse.Namespace   (recipe applied, validated)
    check_data_paths(args)      --data-path / --valid-data-path name readable files (the trainers call it right
                                after parse_args, before any model is built)
    ArgumentError: a bad combination; the message names the flag to change

Flags Megatron users know keep Megatron's names and meanings (--tensor-model-parallel-size, --seq-length,
--global-batch-size, --lr, --save, --load, ...). LongVILA-specific ones are few: --recipe, --vision-encoder,
--llm, --data-path (a JSONL manifest), --num-frames, --metrics-file, --peak-tflops.
Recipe values fill every flag left unset; an explicit flag always wins.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional, Sequence

from ..checkpoint.layout import read_tracker
from ..data.conversation import TEMPLATES
from ..data.video import dali_available
from ..errors import ArgumentError, CheckpointError, OffloadError
from ..runtime.entry import ProjectArgumentParser
from ..runtime.file_view import check_readable, visible
from .faults import add_fault_args, check_fault_args
from .model_flags import add_model_flags
from .recipes import get_recipe, recipe_rope, RECIPES

__all__ = ["build_parser", "parse_args", "expand_flag_files", "ArgumentError"]


def expand_flag_files(argv: Sequence[str]) -> List[str]:
    """`@FILE` arguments replaced by the file's lines (one argument per line, argparse's rule), recursively: the
    project's parser reads them itself; Megatron-LM's parser does not, so both trainers take expanded lists."""
    out: List[str] = []
    for a in argv:
        if not a.startswith("@"):
            out.append(a)
            continue
        try:
            with open(a[1:]) as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ArgumentError(f"{a}: the flag file cannot be read ({e.strerror})") from None
        out.extend(expand_flag_files(lines))
    return out


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    p = ProjectArgumentParser(description="LongVILA training on Megatron-Core (MM-SP)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                                fromfile_prefix_chars="@")
    g = p.add_argument_group("parallelism (Megatron)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="U R: Ulysses size inside a node, ring size across nodes (U*R = CP)")
    g.add_argument("--cp-comm-type", default="a2a+p2p", help="MM-SP is Ulysses x ring: a2a+p2p")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--cpu", action="store_true",
                   help="train on the CPU (gloo; tests and demos): without it, a machine with no visible CUDA device "
                        "stops at start-up")

    g = p.add_argument_group("training (Megatron)")
    g.add_argument("--recipe", default="short_sft", choices=list(RECIPES),
                   help="LongVILA stage: freezing, template, lengths and learning rates")
    g.add_argument("--train-iters", type=int, required=False, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)

    add_activation_memory_args(p)

    g = p.add_argument_group("checkpointing (Megatron)")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="start a new stage from this checkpoint's weights (fresh optimizer, iteration 0)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"])
    add_fault_args(p)  # timeouts, the watchdog, the NaN check, retention, verification on load
    add_checkpoint_io_args(p)  # who writes and reads the shards; --async-save refused

    g = p.add_argument_group("model")
    g.add_argument("--vision-encoder", default=None,
                   help="encoder shape (models.registry.ENCODERS); default: the loaded checkpoint's, else "
                        "siglip_so400m_patch14_384")
    g.add_argument("--llm", default=None,
                   help="LLM shape (models.registry.LLMS); default: the loaded checkpoint's, else qwen2_7b")
    g.add_argument("--projector", default="mlp_downsample")
    g.add_argument("--rotary-base", type=int, default=None,
                   help="RoPE theta; default: the recipe's when it extends the context, else the checkpoint's, "
                        "else the recipe's or the LLM's")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    add_model_flags(p)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="training data: a JSON Lines manifest (LLaVA/VILA conversations) or "
                                                     "a folder of webdataset .tar shards (tools/make_manifest.py "
                                                     "--format shards)")
    g.add_argument("--valid-data-path", default=None)
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model or tokenizer.json; none: bytes")
    g.add_argument("--num-frames", type=int, default=None)
    g.add_argument("--max-skip-fraction", type=float, default=0.1,
                   help="stop when more than this fraction of the samples read so far (over all data-parallel "
                        "ranks) was skipped as bad, judged from the first --min-samples-for-skip-check samples on")
    g.add_argument("--min-samples-for-skip-check", type=int, default=20,
                   help="samples to read (over all data-parallel ranks) before the skip fraction is judged")
    g.add_argument("--loss-weighting", default="token", choices=["token", "sample"],
                   help="token: every learned token weighs its sample's loss_weight; sample: loss_weight / (learned "
                        "tokens of the sample), so each sample counts the same")

    add_data_flags(p)

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, help="one JSON object per iteration")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: 989 on Hopper bf16; no MFU on CPU unless given)")
    g.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    g.add_argument("--verbose", action="store_true", help="show every dependency warning (filtered otherwise: "
                                                          "megatron_longvila.runtime.quiet lists them)")
    if extra_args_provider is not None:
        p = extra_args_provider(p)
    return p


DECODE_BACKENDS = ("auto", "pyav", "dali_cpu", "dali_gpu")
"""--decode-backend's choices (data.video.BACKENDS)."""


def add_data_flags(p: argparse.ArgumentParser, *, megatron: bool = False) -> argparse.ArgumentParser:
    """The data flags: the feed's (training.data_feed) --num-workers (Megatron's own flag under megatron.training,
    with this meaning) and --decode-backend, and --template."""
    g = p.add_argument_group("data feed")
    if not megatron:
        g.add_argument("--num-workers", type=int, default=0,
                       help="0: each step's data is read, planned and decoded on the training thread when the step "
                            "asks for it; N >= 1: a producer thread prepares the next step while the current one "
                            "trains, N threads decoding its videos (same losses for any N)")
    g.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="chat template of the conversations (default: the recipe's; a Llama-3 LLM needs llama3); "
                        "checked against the tokenizer at start-up")
    g.add_argument("--decode-backend", default="auto", choices=DECODE_BACKENDS,
                   help="video decoder: auto (NVDEC through DALI on CUDA where DALI is installed and the codec allows, "
                        "else PyAV), pyav, dali_cpu (VP8/VP9/MJPEG only), dali_gpu (NVDEC)")
    return p


def check_data_flags(a: argparse.Namespace) -> None:
    """--num-workers and --decode-backend that cannot run here fail at start-up, naming the flag."""
    if getattr(a, "num_workers", 0) < 0:
        raise ArgumentError(f"--num-workers {a.num_workers}: must be >= 0")
    backend = getattr(a, "decode_backend", "auto")
    if backend in ("dali_cpu", "dali_gpu") and not dali_available():
        raise ArgumentError(f"--decode-backend {backend} needs NVIDIA DALI (pip install nvidia-dali-cuda130); or use "
                            f"--decode-backend pyav")
    if backend == "dali_gpu" and getattr(a, "cpu", False):
        raise ArgumentError("--decode-backend dali_gpu decodes on the GPU (NVDEC): drop --cpu, or use dali_cpu / pyav")


ASYNC_SAVE_REFUSED = (
    "--async-save: the project's saves are synchronous. A save commits (each rank's files checksummed, the folder "
    "renamed, the tracker replaced) only once every rank's files are on disk, and megatron-core 0.16.1's asynchronous "
    "writer hangs on CPU; the fully parallel save (the default) already spreads the writes over the data-parallel "
    "replicas. Drop --async-save")
"""Why --async-save is refused under the project's loop (checkpoint.distributed)."""


def add_checkpoint_io_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--ckpt-fully-parallel-save (Megatron's default) / --no-ckpt-fully-parallel-save, --ckpt-fully-parallel-load
    (checkpoint.distributed.ParallelIO), and --async-save, accepted only to be refused with its reason."""
    g = p.add_argument_group("checkpoint I/O (Megatron)")
    g.add_argument("--ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_true", default=True,
                   help="spread the writes of shards replicated over data-parallel (x context-parallel) ranks over "
                        "those ranks, each shard written once (the default, as in Megatron-LM)")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_false",
                   default=argparse.SUPPRESS,  # the default is the flag above's
                   help="the ranks holding replica 0 of a shard write it (the data-parallel-rank-0 ranks write "
                        "everything replicated)")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="each data-parallel (x context-parallel) rank reads a share of its group's shards and the "
                        "group exchanges them (fewer bytes read per rank, as many sent between ranks)")
    g.add_argument("--async-save", action="store_true", help="refused: saves are synchronous (see the error)")
    return p


def check_checkpoint_io_args(a: argparse.Namespace) -> None:
    if a.async_save:
        raise ArgumentError(ASYNC_SAVE_REFUSED)


def add_activation_memory_args(p: argparse.ArgumentParser, megatron_has_recompute: bool = False):
    """Recompute flags (Megatron's names) and LongVILA's encoder-recompute and offload flags.

    megatron_has_recompute: the parser is megatron.training's, which already defines Megatron's own recompute flags
    (only LongVILA's are added then)."""
    if not megatron_has_recompute:
        g = p.add_argument_group("activation recompute (Megatron)")
        g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                       help="full: keep only each checkpoint's input and re-run the layers in the backward; selective: "
                            "re-run --recompute-modules inside every layer")
        g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                       help="with full: uniform checkpoints every group of --recompute-num-layers layers; block "
                            "recomputes the first --recompute-num-layers layers of each pipeline stage")
        g.add_argument("--recompute-num-layers", type=int, default=None)
        g.add_argument("--recompute-modules", nargs="+", default=None,
                       help="with selective: core_attn (default), mlp (LLM only), layernorm (needs Transformer Engine)")
        g.add_argument("--recompute-activations", action="store_true",
                       help="Megatron's shorthand for --recompute-granularity selective")
    g = p.add_argument_group("activation memory (LongVILA)")
    g.add_argument("--vision-recompute-granularity", default=None, choices=["full", "selective", "none"],
                   help="the vision encoder's recompute; default: the LLM's settings (--recompute-*)")
    g.add_argument("--vision-recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--vision-recompute-num-layers", type=int, default=None)
    g.add_argument("--vision-recompute-modules", nargs="+", default=None)
    g.add_argument("--cpu-offload-activations", action="store_true",
                   help="keep what the LLM's and the encoder's transformer blocks save for the backward in host memory "
                        "between forward and backward (exact; costs a host copy each way)")
    return p


def check_activation_memory_args(a: argparse.Namespace) -> None:
    """Flag combinations that cannot work, before any model exists (layer counts are checked at build time)."""
    # Here, not at the top: models/ loads megatron-core (seconds), and --help and flag errors answer without it.
    from ..models.offload import activation_memory_from_args

    if getattr(a, "recompute_activations", False) and a.recompute_granularity is None:
        a.recompute_granularity = "selective"
    try:
        m = activation_memory_from_args(a)
        m.llm.validate(None, "LLM")
        m.vision.validate(None, "vision encoder", linear_bias=True)
    except OffloadError as e:
        raise ArgumentError(str(e)) from None


def _apply_recipe(a: argparse.Namespace) -> None:
    r = get_recipe(a.recipe)
    for flag, value in (("seq_length", r.seq_length), ("global_batch_size", r.global_batch_size), ("lr", r.lr),
                        ("min_lr", r.min_lr), ("weight_decay", r.weight_decay), ("num_frames", r.num_frames)):
        if getattr(a, flag) is None:
            setattr(a, flag, value)
    # --rotary-base stays what the user gave (None if not): providers.resolve_model_record ranks the sources.
    a.recipe_changes_rope, a.recipe_rotary_base, a.rotary_base_explicit = recipe_rope(r, a.seq_length, a.rotary_base)
    a.freeze = r.freeze
    a.template = a.template or r.template  # --template overrides the recipe's


def check_load(a: argparse.Namespace) -> Optional[str]:
    """Megatron's --load, made safe: a missing or empty --load is an error (a typo must not restart a run from
    iteration 0), except where starting fresh is meant -- --load equal to --save (resume or start) or combined with
    --pretrained-checkpoint. Returns the start-up note to print (once) when a run starts fresh that way."""
    import os

    load = getattr(a, "load", None)
    if not load:
        return None
    try:
        has = os.path.isdir(load) and read_tracker(load) is not None
    except CheckpointError as e:
        raise ArgumentError(f"--load {load}: {e}") from None
    if has:
        return None
    same_as_save = a.save is not None and os.path.abspath(a.save) == os.path.abspath(load)
    if same_as_save or getattr(a, "pretrained_checkpoint", None):
        return f"no checkpoint in {load} yet: starting from iteration 0"
    what = "does not exist" if not os.path.exists(load) else "holds no checkpoint (no latest_checkpointed_iteration.txt)"
    raise ArgumentError(f"--load {load} {what}: check the path; to start a fresh run drop --load, or give --load "
                        f"equal to --save to resume when a checkpoint exists and start otherwise")


def check_data_paths(a: argparse.Namespace) -> None:
    """--data-path (and --valid-data-path) name files this rank can read, checked before any model is built; one
    line naming the flag. ArgumentError is raised alike: every rank sees the same path. Where one rank alone cannot
    read it (a failing network file system), that rank prints it itself (runtime.entry.run_main)."""
    for flag, path in (("--data-path", getattr(a, "data_path", None)),
                       ("--valid-data-path", getattr(a, "valid_data_path", None))):
        if path is None:
            continue
        if not visible(path):
            raise ArgumentError(f"{flag} {path} does not exist: give a JSON Lines manifest (see "
                                f"tools/make_manifest.py)")
        if os.path.isdir(path):  # webdataset shards (tools/make_manifest.py --energon)
            shards = sorted(f for f in os.listdir(path) if f.endswith(".tar"))
            if not shards:
                raise ArgumentError(f"{flag} {path} is a folder without .tar shards: give a JSON Lines manifest file "
                                    f"or a folder of webdataset shards")
            path = os.path.join(path, shards[0])
        try:
            check_readable(path)
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ArgumentError(f"{flag} {path} cannot be read ({e.strerror or e}): check the file's permissions "
                                f"and its file system") from None


def validate(a: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Check what can be checked before any process group exists; raise ArgumentError naming the flag."""
    if a.train_iters is None or a.train_iters < 1:
        raise ArgumentError("--train-iters is required (>= 1)")
    if a.data_path is None:
        raise ArgumentError("--data-path is required: a JSON Lines manifest (see tools/make_manifest.py)")
    if a.micro_batch_size != 1:
        raise ArgumentError(f"--micro-batch-size {a.micro_batch_size}: a micro-batch is one packed sequence of up "
                            f"to --seq-length tokens; set --micro-batch-size 1 and raise --seq-length to pack more")
    cp = a.context_parallel_size
    hier = a.hierarchical_context_parallel_sizes
    if cp > 1 and hier is None:
        raise ArgumentError(f"--context-parallel-size {cp} needs --hierarchical-context-parallel-sizes U R (U*R = "
                            f"{cp}; Ulysses inside a node, ring across nodes)")
    if hier is not None and (len(hier) != 2 or hier[0] * hier[1] != cp):
        raise ArgumentError(f"--hierarchical-context-parallel-sizes {' '.join(map(str, hier))}: give two sizes U R "
                            f"with U*R = --context-parallel-size {cp}")
    if world_size is not None:
        mp = a.tensor_model_parallel_size * a.pipeline_model_parallel_size * cp
        if world_size % mp:
            raise ArgumentError(f"world size {world_size} is not a multiple of TP*PP*CP = {mp}: change "
                                f"--tensor-model-parallel-size, --pipeline-model-parallel-size or "
                                f"--context-parallel-size (or the number of ranks)")
        dp = world_size // mp
        if a.global_batch_size % (a.micro_batch_size * dp):
            raise ArgumentError(f"--global-batch-size {a.global_batch_size} is not a multiple of --micro-batch-size "
                                f"x data-parallel size = {a.micro_batch_size * dp}")
    check_activation_memory_args(a)
    check_fault_args(a)
    check_checkpoint_io_args(a)
    check_data_flags(a)
    if a.save_interval is not None and a.save is None:
        raise ArgumentError("--save-interval without --save: give the checkpoint directory")
    check_load(a)
    if not 0.0 <= a.max_skip_fraction <= 1.0:
        raise ArgumentError(f"--max-skip-fraction {a.max_skip_fraction}: give a fraction between 0 and 1")
    if a.eval_interval is not None and a.valid_data_path is None:
        raise ArgumentError("--eval-interval needs --valid-data-path")
    if a.tensorboard_dir is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except Exception:
            raise ArgumentError("--tensorboard-dir given but TensorBoard does not import: pip install tensorboard, "
                                "or drop --tensorboard-dir") from None
    if a.lr_warmup_iters is None:
        a.lr_warmup_iters = int(get_recipe(a.recipe).lr_warmup_fraction * a.train_iters)
    if a.lr_decay_iters is None:
        a.lr_decay_iters = a.train_iters
    if a.lr_warmup_iters >= a.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {a.lr_warmup_iters} must be below --lr-decay-iters "
                            f"{a.lr_decay_iters} (default: --train-iters)")


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider: Optional[Callable] = None,
               world_size: Optional[int] = None) -> argparse.Namespace:
    a = build_parser(extra_args_provider).parse_args(argv)
    _apply_recipe(a)
    validate(a, world_size)
    return a

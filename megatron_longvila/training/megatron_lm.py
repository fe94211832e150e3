"""Drive LongVILA's providers with Megatron-LM's own `megatron.training.pretrain` (a Megatron-LM checkout).

    pretrain(datasets_provider, model_provider, forward_step, *, extra_args_provider=None, argv=None)
    get_args()                        the run's arguments: megatron.training's under `pretrain` here, else the
                                      project loop's (the providers call this one and work under both)
    longvila_args_provider(parser)    LongVILA's flags for Megatron's parser, and LongVILA's defaults for
                                      Megatron's flags (recipe, LLM shape, CPU settings)
    args_provider_for(extra)          the extra_args_provider given to megatron.training (LongVILA's flags, the
                                      script's, and which flags the command line gave)
    enable_megatron_training_on_cpu() the stand-ins megatron.training needs on a CPU build of torch

The checkout is the one named in patches/README.md (it needs no patch). Megatron's flags keep Megatron's names
and meanings; --recipe, --vision-encoder, --llm, --projector and --num-frames are LongVILA's. The recipe and
the LLM fill Megatron's flags that are left unset (sequence length, batch, learning rates, layer shapes), so
the same command line trains the same run as the project's own loop. Each flag the command line gives is
LongVILA's, mapped into the model's configs with Megatron's meaning, consumed by megatron.training, or refused
(training.megatron_flags): Megatron's parser defaults (dropouts of 0.1, fusions on) do not reach the model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Callable, List, Optional

import torch

from ..checkpoint.data_state import data_state_path, read_data_state, writes_data_state
from ..checkpoint.resume import agree_resume, check_loaded
from ..errors import ArgumentError
from ..models.record import write_model_record
from ..models.registry import LLMS
from ..parallel.placement import check_node_placement
from ..runtime import cpu as cpu_runtime
from ..runtime.cpu import enable_cpu_runtime
from ..runtime.probes import te_available
from ..runtime.versions import applying
from .arguments import (add_activation_memory_args, add_data_flags, check_activation_memory_args, check_data_flags,
                        check_data_paths, check_load)
from .loop import check_device
from .loop import get_args as loop_args
from .megatron_flags import check_megatron_flags, given_dests, model_flags_from_megatron
from .recipes import RECIPES, get_recipe, recipe_rope

__all__ = ["pretrain", "get_args", "longvila_args_provider", "args_provider_for", "enable_megatron_training_on_cpu",
           "TRAINING_MODULES"]

_ACTIVE = False  # megatron.training is driving this process
_PLACEMENT_CHECKED = False
_FINALIZED = False
_COMMAND_LINE = None  # (the dests the command line gave, LongVILA's own dests, the parser)

# megatron.training modules that call torch.cuda directly on the way through a tiny CPU run.
TRAINING_MODULES: List[str] = [
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.arguments",
    "megatron.training.utils",
    "megatron.training.checkpointing",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
]

_BATCH_INVARIANT = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


def _no_triton_stand_in() -> None:
    # megatron.training.initialize imports Megatron's Triton batch-invariant kernels at import time; a CPU
    # build of torch has no Triton. The stand-in only refuses the flag that would use them.
    if importlib.util.find_spec("triton") is not None or _BATCH_INVARIANT in sys.modules:
        return
    mod = types.ModuleType(_BATCH_INVARIANT)

    def enable_batch_invariant_mode(*_a, **_k):
        raise ArgumentError("--batch-invariant-mode needs Triton (GPU): drop the flag on CPU")

    mod.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules[_BATCH_INVARIANT] = mod


class _Stream:
    """A CUDA stream on the CPU: everything runs in order, so waiting is a no-op."""

    def wait_stream(self, _other):
        return None

    def synchronize(self):
        return None


def enable_megatron_training_on_cpu() -> bool:
    """Let megatron.training run on a CPU build of torch (gloo); True when active. Idempotent; no-op on GPUs.

    On top of the project's CPU runtime (megatron_longvila.runtime.cpu), for megatron.training's modules:
    their own CPU view of torch.cuda (available, one device, streams that need no waiting), Module.cuda()
    and Tensor.cuda() meaning "stay on the CPU" when Megatron-LM calls them, and two GPU-only start-up steps
    left out: the JIT-fusion warm-up (CPU runs turn every fusion off, and the warm-up would consume the
    random stream the model is initialised from) and the compilation of the indexed-dataset helpers and
    fused kernels (LongVILA reads JSONL manifests, not Megatron's indexed datasets).
    """
    if not enable_cpu_runtime():
        return False
    applying("megatron_lm_cpu")
    _no_triton_stand_in()
    base = importlib.import_module("megatron.core.utils").torch  # the CPU runtime's per-module torch
    view = type(base)()  # a fresh one, so megatron-core's own view stays exactly as the runtime set it
    cuda = view.cuda
    cuda.is_available = lambda: True  # initialize_megatron asserts it; every CUDA call here is a stand-in
    cuda.device_count = lambda: 1  # parallel state and model-parallel seeds are set up only with a device
    cuda.set_device = lambda *a, **k: None
    cuda.Stream = lambda *a, **k: _Stream()
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # No compute capability: Megatron then applies its pre-Blackwell rules (see pretrain's environment).
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=0, minor=0, name="cpu",
                                                                       total_memory=0, multi_processor_count=0)
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    for name in TRAINING_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = view

    if "megatron.training." not in cpu_runtime.CUDA_CALLERS:  # Module/Tensor.cuda() from Megatron-LM stays on CPU
        cpu_runtime.CUDA_CALLERS.append("megatron.training.")

    initialize = importlib.import_module("megatron.training.initialize")
    training = importlib.import_module("megatron.training.training")
    initialize._compile_dependencies = lambda: None
    training.set_jit_fusion_options = lambda: None
    return True


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------

def _preparse(argv: List[str]) -> argparse.Namespace:
    """The few flags LongVILA's defaults depend on, read before Megatron parses the command line."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--recipe", default="short_sft", choices=list(RECIPES))
    p.add_argument("--llm", default="qwen2_7b")
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None)
    p.add_argument("--cpu", action="store_true")
    return p.parse_known_args(argv)[0]


def longvila_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """LongVILA's flags on Megatron's parser; LongVILA's values as the defaults of Megatron's own flags."""
    g = parser.add_argument_group("LongVILA")
    g.add_argument("--recipe", default="short_sft", choices=list(RECIPES),
                   help="LongVILA stage: freezing, template, lengths and learning rates")
    g.add_argument("--cpu", action="store_true",
                   help="train on the CPU (gloo; tests and demos): without it, a machine with no visible CUDA device "
                        "stops at start-up")
    g.add_argument("--vision-encoder", default="siglip_so400m_patch14_384")
    g.add_argument("--llm", default="qwen2_7b", help="the LLM's shape; sets --num-layers, --hidden-size, ...")
    g.add_argument("--projector", default="mlp_downsample")
    g.add_argument("--num-frames", type=int, default=None)
    g.add_argument("--loss-weighting", default="token", choices=["token", "sample"])
    g.add_argument("--max-skip-fraction", type=float, default=0.1)
    g.add_argument("--min-samples-for-skip-check", type=int, default=20)
    add_data_flags(parser, megatron=True)  # --decode-backend; Megatron's --num-workers drives the data producer
    # Megatron's --recompute-* flags are its own (TransformerConfig fields); LongVILA adds the encoder's and offload.
    add_activation_memory_args(parser, megatron_has_recompute=True)
    # TransformerConfig fields Megatron-LM 0.16.1's parser leaves out (it turns RoPE fusion on, off with
    # --no-rope-fusion): the project loop's names, so both trainers take the same command line.
    options = parser._option_string_actions
    if "--fp8-dot-product-attention" not in options:
        g.add_argument("--fp8-dot-product-attention", action="store_true",
                       help="FP8 attention (MM-SP's ring blocks on Transformer Engine's FP8 kernel; with --fp8-format)")
    if "--apply-rope-fusion" not in options:
        g.add_argument("--apply-rope-fusion", dest="apply_rope_fusion", action="store_true",
                       help="fused RoPE (Transformer Engine on CUDA)")

    pre = _preparse(sys.argv[1:])
    r = get_recipe(pre.recipe)
    if pre.llm not in LLMS:
        raise ArgumentError(f"--llm {pre.llm}: unknown; one of {sorted(LLMS)}")
    shape = LLMS[pre.llm]
    seq = pre.seq_length or r.seq_length
    rope = recipe_rope(r, seq, given=0)[1]  # the recipe's base (given=0: no refusal here; _finalize refuses)
    defaults = dict(
        # The recipe's values (the project loop's rule: a recipe fills every flag left unset).
        seq_length=r.seq_length, global_batch_size=r.global_batch_size, lr=r.lr, min_lr=r.min_lr,
        weight_decay=r.weight_decay, num_frames=r.num_frames,
        rotary_base=rope,  # None: the LLM's own base (Megatron's 10000 would silently change the model)
        # The project loop's defaults where Megatron's differ.
        micro_batch_size=1, adam_beta2=0.95, lr_decay_style="cosine", log_interval=1, eval_iters=10, num_workers=0,
        eval_interval=1000,  # Megatron sizes validation data with it; nothing is evaluated without --valid-data-path
        # The LLM's shape, so Megatron's checks and FLOPs figures describe the model actually built.
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads,
        max_position_embeddings=max(shape.max_position_embeddings, seq),
        # The LongVILA tokenizer is the project's (--tokenizer-model); Megatron's own is only a placeholder.
        tokenizer_type="NullTokenizer", vocab_size=shape.vocab_size,
        # MM-SP shards give ranks unequal token counts: only per-token loss scaling is the exact global mean.
        calculate_per_token_loss=True, accumulate_allreduce_grads_in_fp32=True,
        dataloader_type="external",  # the providers return LongVILA's own packed-sequence streams
    )
    if pre.train_iters:
        defaults["lr_warmup_iters"] = int(r.lr_warmup_fraction * pre.train_iters)
    if pre.hierarchical_context_parallel_sizes:
        defaults["cp_comm_type"] = ["a2a+p2p"]  # MM-SP is Ulysses (a2a) x ring (p2p)
    if not te_available():
        defaults["transformer_impl"] = "local"
    if pre.cpu:
        defaults.update(distributed_backend="gloo", use_cpu_initialization=True, masked_softmax_fusion=False,
                        bias_gelu_fusion=False, bias_swiglu_fusion=False, bias_dropout_fusion=False,
                        gradient_accumulation_fusion=False, apply_rope_fusion=False)
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    return parser


def args_provider_for(extra_args_provider: Optional[Callable] = None) -> Callable:
    """megatron.training's extra_args_provider: LongVILA's flags, the script's, and a record of which flags the
    command line (sys.argv, which Megatron's parser reads) gave, for _finalize."""

    def args_provider(parser):
        global _COMMAND_LINE
        megatrons = {a.dest for a in parser._actions}
        parser = longvila_args_provider(parser)
        parser = extra_args_provider(parser) if extra_args_provider is not None else parser
        _COMMAND_LINE = (given_dests(parser, sys.argv[1:]), {a.dest for a in parser._actions} - megatrons, parser)
        return parser

    return args_provider


def _finalize(args) -> None:
    """Adapt Megatron's parsed arguments to what the providers read (once, on first use)."""
    if _COMMAND_LINE is not None:
        # Each flag the user gave is LongVILA's, mapped into the model's configs, consumed by megatron.training, or
        # refused; the model's flags are resolved from what was given, not from Megatron's defaults (its dropouts
        # of 0.1, its fusions on), as the project loop resolves them (training.model_flags).
        given, ours, parser = _COMMAND_LINE
        check_megatron_flags(given, ours, parser)
        args.model_flags_given = model_flags_from_megatron(args, given)
    check_data_flags(args)
    if args.optimizer not in ("adam", "sgd"):
        raise ArgumentError(f"--optimizer {args.optimizer}: LongVILA trains with adam or sgd under "
                            f"--use-megatron-training")
    for flag in ("data_path", "valid_data_path"):
        value = getattr(args, flag)
        if isinstance(value, list):
            if len(value) > 1:
                raise ArgumentError(f"--{flag.replace('_', '-')} takes one JSONL manifest under LongVILA, got "
                                    f"{len(value)} (Megatron's weighted blends are for indexed datasets)")
            setattr(args, flag, value[0] if value else None)
    if args.valid_data_path is None:
        args.eval_iters = 0  # nothing to evaluate; Megatron would otherwise step a validation stream that is None
    if args.data_path is None:
        raise ArgumentError("--data-path is required: a JSON Lines manifest (see tools/make_manifest.py)")
    if args.micro_batch_size != 1:
        raise ArgumentError(f"--micro-batch-size {args.micro_batch_size}: a micro-batch is one packed sequence; "
                            f"set --micro-batch-size 1 and raise --seq-length to pack more")
    r = get_recipe(args.recipe)
    # Megatron's --rotary-base defaults to the recipe's base here (see longvila_args_provider): only a different
    # value was given on purpose.
    base = recipe_rope(r, args.seq_length, given=0)[1]
    given = args.rotary_base if args.rotary_base != base else None
    args.recipe_changes_rope, args.recipe_rotary_base, args.rotary_base_explicit = recipe_rope(r, args.seq_length,
                                                                                               given)
    _check_activation_memory(args)
    # One resume decision per job (checkpoint.resume), before the --load check reads the tracker on each rank alone;
    # every rank gets here in the model provider. Megatron's own load then reads the tracker the ranks agreed on.
    agree_resume(args.load)
    # Megatron-LM's --load only warns when it finds no checkpoint and trains from iteration 0; here, as in the
    # project's loop, that is an error unless starting fresh is meant (--load == --save, or a pretrained start).
    note = check_load(args)
    if note and torch.distributed.get_rank() == 0:
        print(f"[checkpoint] {note}", flush=True)
    args.freeze = r.freeze
    args.template = getattr(args, "template", None) or r.template  # --template overrides the recipe's


def _check_activation_memory(args) -> None:
    """Megatron's recompute flags reach LongVILA's TransformerConfigs through the model provider
    (models.offload.activation_memory_from_args); the memory flags that could not are refused here."""
    if getattr(args, "distribute_saved_activations", False):
        raise ArgumentError("--distribute-saved-activations: LongVILA's model provider does not split checkpoint "
                            "inputs over TP; drop it (MM-SP already shards the sequence over CP)")
    if getattr(args, "cpu_offloading", False) or getattr(args, "cpu_offloading_num_layers", 0):
        raise ArgumentError("--cpu-offloading-num-layers: Megatron's offloading needs Transformer Engine and refuses "
                            "pipeline parallelism and recompute; use LongVILA's --cpu-offload-activations")
    if getattr(args, "fine_grained_activation_offloading", False):
        raise ArgumentError("--fine-grained-activation-offloading is Transformer Engine's; use LongVILA's "
                            "--cpu-offload-activations")
    check_activation_memory_args(args)


def get_args():
    """The arguments of whichever trainer is running (the providers work under both)."""
    global _FINALIZED
    if not _ACTIVE:
        return loop_args()
    from megatron.training import get_args as megatron_args

    args = megatron_args()
    if not _FINALIZED:
        _finalize(args)
        check_data_paths(args)  # before the model provider builds anything: one line naming the flag
        _FINALIZED = True
    return args


# ------------------------------------------------------------------------------------------------------
# pretrain
# ------------------------------------------------------------------------------------------------------

_TRAIN_STREAM = None  # the training dataset object the provider returned (its state_dict is saved)


def _iteration_dir(root: str, iteration: int) -> str:
    """Megatron's iter_N folder for a save or load (its own naming, checkpoint/data_state.py's layout inside)."""
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(root, iteration, return_base_dir=True)


def _save_data_state(iteration: int) -> None:
    """Write the training stream's position into the checkpoint Megatron is about to save.

    Megatron's checkpoint records consumed samples, not where LongVILA's streams stand (samples skipped as bad
    and packing make the two differ). Every rank has written its file before it enters Megatron's save,
    whose collectives come before rank 0 names the checkpoint in the tracker: a named checkpoint has them.
    """
    from megatron.core import parallel_state as ps
    from megatron.training import get_args as megatron_args

    args = megatron_args()
    if args.save and torch.distributed.get_rank() == 0:
        # The model record (models.record) beside Megatron's files: a later --load compares it before loading.
        record = getattr(getattr(getattr(_TRAIN_STREAM, "step", None), "model", None), "record", None)
        if record is not None:
            base = _iteration_dir(args.save, iteration)
            os.makedirs(base, exist_ok=True)
            write_model_record(base, record)
    state = getattr(_TRAIN_STREAM, "state_dict", None)
    if not args.save or state is None:
        return
    # The ranks of one data-parallel replica read identical streams: one of them writes.
    if not writes_data_state():
        return
    path = data_state_path(_iteration_dir(args.save, iteration), ps.get_data_parallel_rank())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state(), path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written state under the final name


def _hook_checkpoint_saves() -> None:
    import megatron.training.training as mt

    applying("megatron_lm_save_hook")
    if getattr(mt.save_checkpoint, "_longvila_data_state", False):
        return
    save = mt.save_checkpoint

    def save_checkpoint(iteration, *args, **kwargs):
        if not kwargs.get("non_persistent_ckpt", False) and not kwargs.get("release", False):
            _save_data_state(iteration)
        return save(iteration, *args, **kwargs)

    save_checkpoint._longvila_data_state = True
    mt.save_checkpoint = save_checkpoint


def _resume_stream(stream, args) -> None:
    """Put a resumed run's training stream where the loaded checkpoint's run left it.

    From the state saved with the checkpoint when there is one; otherwise (a checkpoint saved without this
    hook) by replaying the sequences Megatron counts as consumed: exact too (the streams are deterministic),
    only slower, since every replayed sample is read and tokenized again.
    """
    from megatron.core import parallel_state as ps

    path = data_state_path(_iteration_dir(args.load, args.iteration), ps.get_data_parallel_rank())
    state = read_data_state(_iteration_dir(args.load, args.iteration), ps.get_data_parallel_rank())
    if state is not None and hasattr(stream, "load_state_dict"):
        stream.load_state_dict(state)
        return None
    # micro-batch = one packed sequence; each DP replica consumed its 1/DP share of the global samples
    skip = args.consumed_train_samples // ps.get_data_parallel_world_size()
    if not (ps.get_data_parallel_rank() or ps.get_tensor_model_parallel_rank() or ps.get_context_parallel_rank()):
        print(f"LongVILA: no data state at {path}; replaying {skip} sequences per data-parallel rank", flush=True)
    feed = getattr(stream, "feed", None)
    if feed is not None:  # a PlannedStream: its replica's reader replays the packed sequences
        feed.replay(skip)
        return iter(feed)  # iter: a producer starts here (pipeline parallelism, --num-workers)
    it = iter(stream)
    for _ in range(skip):
        next(it)
    return it


class _TimedData:
    """The training data iterator timed as Megatron's own GPT script times its batches: megatron.training's
    "batch-generator" timer (printed with --timing-log-level 2) holds each step's wait for its data."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        from megatron.training import get_timers

        timer = get_timers()("batch-generator", log_level=2)
        timer.start()
        try:
            return next(self.it)
        finally:
            timer.stop()


def _streams(datasets_provider: Callable) -> Callable:
    """The project's resumable datasets as the iterators megatron.training's "external" loaders pass on."""

    def provider(train_val_test_num_samples):
        global _TRAIN_STREAM
        args = get_args()  # adapt the arguments before the provider reads them
        train, valid, test = datasets_provider(train_val_test_num_samples)
        _TRAIN_STREAM = train
        check_loaded(args.load, args.iteration if args.load else None)  # after Megatron's load: one iteration
        train_iter = None
        if train is not None and args.load and args.iteration > 0 and not args.finetune:
            train_iter = _resume_stream(train, args)
        if train is not None and train_iter is None:
            train_iter = iter(train)
        if train_iter is not None:
            train_iter = _TimedData(train_iter)
        return (train_iter,) + tuple(None if d is None else iter(d) for d in (valid, test))

    # Every rank reads its own stream (TP and CP ranks of a replica read the same sequences); Megatron
    # would otherwise build datasets on tensor-parallel rank 0 only.
    provider.is_distributed = True
    return provider


def pretrain(datasets_provider: Callable, model_provider: Callable, forward_step: Callable, *,
             extra_args_provider: Optional[Callable] = None, argv: Optional[List[str]] = None):
    """megatron.training.pretrain on LongVILA's providers; every rank calls it (torchrun's environment)."""
    global _ACTIVE, _FINALIZED
    pre = _preparse(sys.argv[1:] if argv is None else list(argv))
    check_device(pre.cpu)  # CUDA, or an explicit --cpu (as the project loop)
    if pre.cpu:
        enable_megatron_training_on_cpu()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain as megatron_pretrain

    if not torch.cuda.is_available():
        # Megatron asserts this (pre-Blackwell) setting for TP or CP; on a CPU it means nothing.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    if argv is not None:
        sys.argv = sys.argv[:1] + list(argv)  # Megatron's parser reads sys.argv

    def models(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        # LongVILA builds its own TransformerConfig from --llm and uses Megatron's global parallel state.
        from megatron.core.process_groups_config import ProcessGroupCollection

        get_args()
        if not _PLACEMENT_CHECKED:
            # As the project loop does: TP and Ulysses groups inside one node, checked once Megatron's groups exist.
            check_node_placement()
            globals()["_PLACEMENT_CHECKED"] = True
        model = model_provider(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if getattr(model, "pg_collection", None) is None:  # megatron.training's loop reads it off the model
            model.pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        return model

    _hook_checkpoint_saves()
    _ACTIVE, _FINALIZED = True, False
    try:
        return megatron_pretrain(_streams(datasets_provider), models, ModelType.encoder_or_decoder, forward_step,
                                 extra_args_provider=args_provider_for(extra_args_provider))
    finally:
        _ACTIVE = False

"""A Megatron-style training loop on megatron-core's own pieces (the wheel has no megatron.training).

    pretrain(train_valid_test_dataset_provider, model_provider, forward_step_func, *, extra_args_provider=None,
             argv=None, hooks=None) -> TrainResult
    get_args() -> argparse.Namespace        the parsed arguments (as megatron.training.get_args)
    TrainResult                             losses per iteration, last metrics, checkpoint directory

The three providers have Megatron's signatures, so the same functions plug into megatron.training.pretrain
when a Megatron-LM checkout is importable:
    model_provider(pre_process=True, post_process=True, vp_stage=None) -> MegatronModule
    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)
    train_valid_test_dataset_provider(train_val_test_num_samples) -> (train, valid, test)
Datasets here are resumable iterables: `iter(ds)` gives micro-batches and `ds.state_dict()` /
`ds.load_state_dict()` give and restore the position (stored in every checkpoint).

One iteration: Megatron's forward/backward schedule over global_batch / (micro_batch x DP) micro-batches,
DDP's gradient reduction over DP x CP (per-token loss: calculate_per_token_loss), the Megatron optimizer's
step, the scheduler's step; then logging, evaluation and checkpointing at their intervals.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..checkpoint.resume import agree_resume, check_loaded
from ..errors import ArgumentError, CheckpointError
from ..parallel.placement import check_node_placement
from ..parallel.timeouts import set_group_timeout
from ..runtime.cpu import enable_cpu_runtime
from ..runtime.entry import once
from .arguments import build_parser, check_data_paths, check_load, parse_args
from .faults import FaultGuard, start_monitor
from .logging import TrainLogger

__all__ = ["pretrain", "get_args", "TrainResult"]

_ARGS = None


def get_args():
    """The arguments `pretrain` parsed (providers read them, as with megatron.training.get_args)."""
    if _ARGS is None:
        raise RuntimeError("get_args() before pretrain() parsed the arguments")
    return _ARGS


@dataclass
class TrainResult:
    """What a run did (returned on every rank)."""

    losses: Dict[int, float] = field(default_factory=dict)
    """Global token-mean training loss per iteration run in this process."""
    start_iteration: int = 0
    """Iteration the run resumed after (0 for a fresh start)."""
    last_metrics: Optional[dict] = None
    """The last iteration's metrics record."""
    saved: List[str] = field(default_factory=list)
    """Checkpoint directories committed."""
    valid_losses: Dict[int, float] = field(default_factory=dict)
    """Validation loss per evaluation."""
    tokens_per_s: List[float] = field(default_factory=list)
    """Throughput per iteration."""


def check_device(cpu: bool) -> None:
    """Train on CUDA, or on the CPU only when asked (--cpu); a GPU node with a broken driver must not train on its
    CPU without a word. Raises ArgumentError naming the flag."""
    if cpu and torch.cuda.is_available():
        raise ArgumentError("--cpu on a machine with a visible CUDA device: the CPU runtime stays off where CUDA is "
                            "available; drop --cpu, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU")
    if not cpu and not torch.cuda.is_available():
        raise ArgumentError("no CUDA device is visible to this process: check the GPUs and their driver "
                            "(nvidia-smi), or give --cpu to train on the CPU (gloo; for tests and demos)")


def _init_distributed(timeout_minutes: int = 10) -> None:
    # --distributed-timeout-minutes reaches every group: this one, Megatron's, and the project's (new_group does
    # not inherit the default group's timeout).
    set_group_timeout(datetime.timedelta(minutes=timeout_minutes))
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise ArgumentError("no process group and no RANK in the environment: launch with torchrun (or srun via "
                            "examples/slurm), or use --demo for the single-command CPU demo")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _init_megatron(args) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    # Megatron's seeding: the same default seed on every rank of a pipeline stage (replicated weights agree),
    # distinct tensor-parallel seeds inside the model-parallel RNG tracker.
    seed = args.seed + 100 * ps.get_pipeline_model_parallel_rank()
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _build_model(model_provider, args):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron.core.enums import ModelType

    model = model_provider(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model.model_type = ModelType.encoder_or_decoder  # as megatron.training's get_model sets it
    if torch.cuda.is_available():
        # As megatron.training's get_model: modules built outside Megatron's layers (the patch convolution, norms)
        # start on the host.
        model.cuda(torch.cuda.current_device())
    config = model.config
    if not getattr(config, "calculate_per_token_loss", False):
        raise ArgumentError("the model's TransformerConfig needs calculate_per_token_loss=True: MM-SP shards give "
                            "ranks different token counts and only per-token scaling is the exact global mean")
    # --overlap-grad-reduce / --overlap-param-gather, as resolved for the model (training.model_flags): a rank that
    # encodes no frame still has every trainable encoder and projector parameter in its backward
    # (models.longvila: a zero-weight contribution), so the overlapped buckets all complete.
    overlap = dict(getattr(model, "resolved", None).ddp if getattr(model, "resolved", None) is not None else {})
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer, **overlap)
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    # Interleaved pipelines with batched p2p give wrong results on gloo when both neighbours are one rank
    # (measured with megatron-core 0.16.1); separate sends/receives are exact and cost little.
    config.batch_p2p_comm = False
    return model, ddp, config


def _build_optimizer(ddp, args):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if not any(p.requires_grad for p in ddp.parameters()):
        raise ArgumentError(f"--recipe {args.recipe}: nothing trains on this rank (all parameters frozen)")
    oc = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                         adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                         clip_grad=args.clip_grad, bf16=args.bf16,
                         params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                         use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(oc, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=args.lr_decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant")
    return optimizer, scheduler


def _step_figures(store: list, tokens: int, flops: float = 0.0) -> tuple:
    """(loss sum, loss count, tokens, model FLOPs) of a step over the whole world, in one all-reduce.

    The loss reports live on the last pipeline stage, each rank holding its local [sum, count]; tensor-parallel
    ranks hold copies, so tensor-parallel rank 0 contributes them. Tokens and FLOPs are counted once per DP replica
    (its CP/TP ranks read the same sequences): by CP rank 0, TP rank 0 of the first stage.
    """
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    figures = torch.zeros(4, dtype=torch.float64, device=device)
    if store and ps.get_tensor_model_parallel_rank() == 0:
        figures[:2] = torch.stack([item["lm loss"].detach().double().to(device) for item in store]).sum(0)
    if ps.get_context_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.is_pipeline_first_stage():
        figures[2] = float(tokens)
        figures[3] = float(flops)
    dist.all_reduce(figures)
    s, c, t, f = figures.cpu().tolist()
    return s, c, int(t), f


def _run_schedule(forward_step_func, iterator, ddp, args, num_microbatches, forward_only=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # The full --seq-length: the schedule divides by CP (and TP under sequence parallelism) for its p2p shapes.
    return get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=iterator, model=[ddp], num_microbatches=num_microbatches,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=forward_only)


class _CountingIterator:
    """Counts the real (non-filler) tokens a step consumed: a StepBatches iterator counts them itself, and their
    model FLOPs; a plain one is wrapped (its items have a length; no FLOPs)."""

    def __init__(self, it):
        self.it = it
        self._counts_itself = hasattr(it, "tokens")
        self._start = it.tokens() if self._counts_itself else 0
        self._flops_start = it.flops() if hasattr(it, "flops") else None
        self._wait_start = it.data_wait() if hasattr(it, "data_wait") else None
        self._tokens = 0

    @property
    def flops(self) -> Optional[float]:
        return None if self._flops_start is None else self.it.flops() - self._flops_start

    @property
    def data_wait(self) -> Optional[float]:
        """Seconds this step waited for its data (a StepFeed measures it; None for a plain iterator)."""
        return None if self._wait_start is None else self.it.data_wait() - self._wait_start

    @property
    def iterator(self):
        return self.it if self._counts_itself else self

    @property
    def tokens(self) -> int:
        return self.it.tokens() - self._start if self._counts_itself else self._tokens

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self._tokens += len(item)
        return item


def _evaluate(forward_step_func, valid_ds, ddp, args, num_microbatches) -> float:
    ddp.eval()
    total = [0.0, 0.0]
    it = iter(valid_ds)
    with torch.no_grad():
        for _ in range(args.eval_iters):
            store = _run_schedule(forward_step_func, it, ddp, args, num_microbatches, forward_only=True)
            s, c, _, _ = _step_figures(store, 0)
            total[0] += s
            total[1] += c
    ddp.train()
    return total[0] / max(total[1], 1.0)


def pretrain(train_valid_test_dataset_provider: Callable, model_provider: Callable, forward_step_func: Callable,
             *, extra_args_provider: Optional[Callable] = None, argv: Optional[List[str]] = None,
             hooks: Optional[dict] = None) -> TrainResult:
    """Parse arguments, build everything, resume if possible, train, checkpoint. Every rank calls it.

    hooks (tests): {"after_write": fn} is passed to save_checkpoint; {"stop_after": n} ends the run after
    iteration n (and its checkpoint, if one is due), as an interrupted job would.
    """
    global _ARGS
    from megatron.core import parallel_state as ps

    # --help (and flag typos) answer before any process group or launcher is needed.
    pre = build_parser(extra_args_provider).parse_args(argv)
    check_device(pre.cpu)  # CUDA, or an explicit --cpu
    # Here, not at the top: checkpoint/ and conversion/ load megatron-core's models (seconds); --help answers first.
    from ..checkpoint import distributed as ckpt
    from ..conversion import load_pretrained

    _init_distributed(pre.distributed_timeout_minutes)
    start_monitor(pre)  # from here on, a rank that fails alone ends the job promptly (training.watchdog)
    # Before parse_args, whose --load check reads the tracker on each rank alone: one resume decision per job.
    resume_iteration = agree_resume(pre.load)
    cpu = enable_cpu_runtime() if pre.cpu else False
    args = parse_args(argv, extra_args_provider, world_size=dist.get_world_size())
    check_data_paths(args)  # before any model is built: one line naming the flag
    if cpu and args.bf16:
        raise ArgumentError("--bf16 on a CPU run: drop --bf16 (CPU runs are fp32, which makes resume bitwise)")
    _ARGS = args
    hooks = hooks or {}
    _init_megatron(args)
    check_node_placement(args)  # TP and Ulysses groups inside one node, checked against where the ranks run
    note = check_load(args)  # validated by parse_args; here only its note
    if note:
        once(f"[checkpoint] {note}")
    if not args.save:
        once("[checkpoint] no --save given: this run saves nothing")
    dp = ps.get_data_parallel_world_size()
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    model, ddp, config = _build_model(model_provider, args)
    optimizer, scheduler = _build_optimizer(ddp, args)
    guard = FaultGuard(args, ddp=ddp, config=config)  # NaN/Inf policy, hang watchdog, failed saves
    forward_step_func = guard.wrap_forward_step(forward_step_func)

    result = TrainResult()
    parallel_io = ckpt.ParallelIO(fully_parallel_save=args.ckpt_fully_parallel_save,
                                  fully_parallel_load=args.ckpt_fully_parallel_load)
    iteration = 0
    data_state = None
    loaded = None
    if resume_iteration is not None:
        loaded = ckpt.load_checkpoint(args.load, model, None if args.no_load_optim else optimizer,
                                      None if args.no_load_optim else scheduler, load_rng=not args.no_load_rng,
                                      verify="checksums" if args.ckpt_verify_checksums else "sizes",
                                      newest_valid=args.ckpt_load_newest_valid, iteration=resume_iteration,
                                      parallel_io=parallel_io)
        check_loaded(args.load, loaded.iteration)
        iteration = loaded.iteration
        data_state = loaded.data_state
        guard.load_train_state(loaded.train_state)
    elif args.pretrained_checkpoint:
        # A project checkpoint (tracker) as before, or a converted one (HF VILA, NeMo 2, an iteration folder).
        loaded = load_pretrained(args.pretrained_checkpoint, model)
        if hasattr(optimizer, "reload_model_params"):
            optimizer.reload_model_params()
    result.start_iteration = iteration

    train_ds, valid_ds, _ = train_valid_test_dataset_provider(
        [args.train_iters * args.global_batch_size, (args.eval_iters if args.eval_interval else 0)
         * args.global_batch_size, 0])
    if data_state is not None:
        train_ds.load_state_dict(data_state)
    elif iteration > 0 and not args.no_load_optim:
        raise CheckpointError(f"{args.load} has no data position for this rank; cannot resume exactly")

    logger = TrainLogger(args, world_size=dist.get_world_size(), is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)
    if loaded is not None:
        logger.message(f"loaded iteration {loaded.iteration} from "
                       f"{args.load if iteration else args.pretrained_checkpoint} (layout {loaded.layout})"
                       + (f"; {loaded.reads_summary()}" if loaded.reads_summary() else ""))
    logger.message(f"training {args.recipe} (freeze preset {args.freeze}) from iteration {iteration} to "
                   f"{args.train_iters}: {num_microbatches} micro-batches x DP {dp} per step, TP "
                   f"{args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} CP "
                   f"{args.context_parallel_size} {args.hierarchical_context_parallel_sizes or ''}")

    train_iter = iter(train_ds)
    ddp.train()
    while iteration < args.train_iters:
        t0 = time.perf_counter()
        counting = _CountingIterator(train_iter)
        optimizer.zero_grad()
        ddp.zero_grad_buffer()
        with guard.step(iteration + 1):  # timed by the watchdog; a lost peer becomes one message
            store = _run_schedule(forward_step_func, guard.watch(counting.iterator), ddp, args, num_microbatches)
            # A non-finite loss or gradient skips the update (optimizer and schedule untouched) or stops the run.
            stepped, grad_norm = guard.optimizer_step(optimizer, store)
            if stepped:
                scheduler.step(increment=args.global_batch_size)
            iteration += 1
            flops = counting.flops
            guard.mark("step totals")
            s, c, tokens, world_flops = _step_figures(store, counting.tokens, flops or 0.0)
        loss = s / max(c, 1.0)
        step_time = time.perf_counter() - t0
        rec = logger.log(iteration, loss=loss, tokens=tokens, flops=None if flops is None else world_flops,
                         step_time=step_time,
                         lr=optimizer.param_groups[0]["lr"],
                         grad_norm=float(grad_norm) if grad_norm is not None else None,
                         data_wait=_data_wait(counting))
        result.losses[iteration] = loss
        result.last_metrics = rec
        result.tokens_per_s.append(rec["tokens_per_s"])

        if args.eval_interval and iteration % args.eval_interval == 0:
            v = _evaluate(forward_step_func, valid_ds, ddp, args, num_microbatches)
            result.valid_losses[iteration] = v
            logger.message(f"validation loss at iteration {iteration}: {v:.4f}")
        if args.save and ((args.save_interval and iteration % args.save_interval == 0)
                          or iteration == args.train_iters):
            with guard.saving(iteration):  # a failed save: reported once, every rank exits, nothing committed
                result.saved.append(ckpt.save_checkpoint(
                    args.save, iteration, ddp, optimizer, scheduler, data_state=train_ds.state_dict(),
                    train_state={"consumed_samples": iteration * args.global_batch_size, "recipe": args.recipe,
                                 **guard.train_state()},
                    model_record=getattr(model, "record", None), hooks=hooks, retain=args.save_retain,
                    parallel_io=parallel_io))
        if hooks.get("stop_after") == iteration:
            break
    guard.close()
    _close_feeds(train_iter, valid_ds)
    logger.close()
    return result


def _data_wait(counting: "_CountingIterator") -> Optional[float]:
    """The step's wait for data: the slowest rank's, which is what held the step (one host all-reduce MAX)."""
    wait = counting.data_wait
    if wait is None:
        return None
    t = torch.tensor([wait], dtype=torch.float64)
    from megatron.core import parallel_state as ps

    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group_gloo(with_context_parallel=True))
    return float(t[0])


def _close_feeds(train_iter, valid_ds) -> None:
    """Stop the data producers; each rank tells of the files it could not read (the rank that knows)."""
    for feed in (train_iter, getattr(valid_ds, "feed", None)):
        if feed is not None and hasattr(feed, "close"):
            feed.close()
            line = feed.summary() if hasattr(feed, "summary") else None
            if line:
                print(f"[data] {line}", flush=True)

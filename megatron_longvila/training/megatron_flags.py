"""Megatron-LM's command line under --use-megatron-training: which flags the user gave, and for each one whether it is
mapped into LongVILA's configs, consumed by megatron.training itself, or refused (an allow-list).

    given_dests(parser, argv) -> set            the dests of the options on the command line (not the parser's defaults:
                                                Megatron's parser defaults both dropouts to 0.1 and turns the fusions on)
    check_megatron_flags(given, ours, parser)   ArgumentError naming every refused flag with the reason
    model_flags_from_megatron(args, given) -> dict
                                                the given model, kernel and shape flags, in the project parser's dests
                                                and meanings, for training.model_flags.resolve_model

A flag a newer Megatron-LM adds is refused until it is listed here: nothing it would change is silently dropped.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, Iterable, List, Tuple

from ..errors import ArgumentError

__all__ = ["given_dests", "check_megatron_flags", "model_flags_from_megatron", "MAPPED", "CONSUMED", "REFUSED_WHY"]


def _same(v):
    return v


def _negated(v):
    return not v


def _backend_name(v):
    return getattr(v, "name", v)  # Megatron parses --attention-backend into its AttnBackend enum


MAPPED: Dict[str, Tuple[str, Callable]] = {
    # Megatron dest -> (project dest in training.model_flags, value translation)
    "transformer_impl": ("transformer_impl", _same),
    "attention_backend": ("attention_backend", _backend_name),
    "fp8": ("fp8_format", _same),
    "fp8_recipe": ("fp8_recipe", _same),
    "fp8_margin": ("fp8_margin", _same),
    "fp8_amax_history_len": ("fp8_amax_history_len", _same),
    "fp8_amax_compute_algo": ("fp8_amax_compute_algo", _same),
    "fp8_dot_product_attention": ("fp8_dot_product_attention", _same),
    "fp8_param_gather": ("fp8_param_gather", _same),
    "masked_softmax_fusion": ("masked_softmax_fusion", _same),
    "bias_gelu_fusion": ("bias_gelu_fusion", _same),
    "bias_swiglu_fusion": ("bias_swiglu_fusion", _same),
    "bias_dropout_fusion": ("bias_dropout_fusion", _same),
    "apply_rope_fusion": ("apply_rope_fusion", _same),
    "gradient_accumulation_fusion": ("gradient_accumulation_fusion", _same),
    "no_persist_layer_norm": ("persist_layer_norm", _negated),
    "cross_entropy_loss_fusion": ("cross_entropy_loss_fusion", _same),
    "cross_entropy_fusion_impl": ("cross_entropy_fusion_impl", _same),
    "init_method_std": ("init_method_std", _same),
    "attention_dropout": ("attention_dropout", _same),
    "hidden_dropout": ("hidden_dropout", _same),
    "overlap_grad_reduce": ("overlap_grad_reduce", _same),
    "overlap_param_gather": ("overlap_param_gather", _same),
    # shape flags: checked against the model (checkpoint record or --llm)
    "num_layers": ("num_layers", _same),
    "hidden_size": ("hidden_size", _same),
    "ffn_hidden_size": ("ffn_hidden_size", _same),
    "num_attention_heads": ("num_attention_heads", _same),
    "group_query_attention": ("group_query_attention", _same),
    "num_query_groups": ("num_query_groups", _same),
    "max_position_embeddings": ("max_position_embeddings", _same),
    "normalization": ("normalization", _same),
    "layernorm_epsilon": ("norm_epsilon", _same),
    "swiglu": ("swiglu", _same),
    "untie_embeddings_and_output_weights": ("untie_embeddings_and_output_weights", _same),
    "add_bias_linear": ("disable_bias_linear", _negated),
    "add_qkv_bias": ("add_qkv_bias", _same),
}
"""Megatron's model and kernel flags, resolved by training.model_flags with Megatron's meaning."""

CONSUMED = frozenset({
    # parallelism and precision (read by the model provider as well)
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "hierarchical_context_parallel_sizes", "sequence_parallel", "use_cpu_initialization", "bf16",
    "calculate_per_token_loss", "cp_comm_type", "rotary_base", "make_vocab_size_divisible_by",
    "accumulate_allreduce_grads_in_fp32", "grad_reduce_in_bf16",
    # recompute (the provider's activation_memory_from_args; --distribute-saved-activations and Megatron's
    # offloading are refused with their reasons at start-up)
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "recompute_activations", "distribute_saved_activations", "cpu_offloading_num_layers",
    "fine_grained_activation_offloading",
    # data-parallel communication and the optimizer
    "use_distributed_optimizer", "distributed_backend", "distributed_timeout_minutes", "ddp_bucket_size",
    "ddp_num_buckets", "ddp_average_in_collective", "align_grad_reduce", "align_param_gather", "local_rank",
    "optimizer", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum",
    "start_weight_decay", "end_weight_decay", "weight_decay_incr_style",
    # schedule
    "micro_batch_size", "global_batch_size", "train_iters", "seq_length", "seed", "lr", "min_lr", "lr_decay_style",
    "lr_decay_iters", "lr_warmup_fraction", "lr_warmup_iters", "lr_warmup_init", "lr_wsd_decay_style",
    "lr_wsd_decay_iters", "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler",
    "empty_unused_memory_level", "manual_gc", "manual_gc_interval", "manual_gc_eval",
    "check_for_nan_in_loss_and_grad", "rerun_mode", "check_for_spiky_loss",
    # exit
    "exit_interval", "exit_duration_in_mins", "exit_signal_handler", "exit_signal",
    # data (LongVILA's manifests; the data loader is LongVILA's own)
    "data_path", "valid_data_path", "tokenizer_model", "eval_iters", "eval_interval", "dataloader_type",
    "num_workers",  # the data producer's threads (training.data_feed), as under the project loop
    # checkpointing
    "save", "save_interval", "load", "finetune", "no_save_optim", "no_save_rng", "no_load_optim", "no_load_rng",
    "ckpt_format", "ckpt_step", "exit_on_missing_checkpoint", "ckpt_fully_parallel_load",
    "ckpt_fully_parallel_save", "dist_ckpt_strictness",
    # Megatron's --ckpt-fully-parallel-save asks for its default (fully parallel; Megatron notes it changes nothing)
    "ckpt_fully_parallel_save_deprecated",
    # logging and profiling
    "log_interval", "log_params_norm", "log_throughput", "log_progress", "timing_log_level", "timing_log_option",
    "tensorboard_dir", "tensorboard_log_interval", "tensorboard_queue_size", "log_timers_to_tensorboard",
    "log_loss_scale_to_tensorboard", "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard",
    "log_memory_interval", "log_world_size_to_tensorboard", "log_num_zeros_in_grad", "log_device_memory_used",
    "wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity", "logging_level", "log_energy",
    "log_straggler", "straggler_ctrlr_port", "straggler_minmax_count", "disable_straggler_on_startup",
    "enable_one_logger", "one_logger_project", "one_logger_run_name", "one_logger_async",
    "profile", "profile_step_start", "profile_step_end", "use_pytorch_profiler", "profile_ranks",
    "record_memory_history", "memory_snapshot_path",
})
"""Megatron's flags that megatron.training (or LongVILA's providers, with Megatron's meaning) acts on as given."""

REFUSED_WHY: Dict[str, str] = {
    "fp16": "LongVILA trains in bf16 or fp32 (fp16's loss scaling is not wired into its model); use --bf16",
    "train_samples": "LongVILA's schedule counts iterations: use --train-iters",
    "tokenizer_type": "LongVILA loads its tokenizer from --tokenizer-model (or the checkpoint's record)",
    "vocab_size": "the vocabulary comes from the LLM (--llm or the checkpoint's record)",
    "async_save": "LongVILA saves its data-stream state beside each checkpoint, which async saving would outrun",
    "spec": "LongVILA builds its own layer specs: use --transformer-impl",
    "yaml_cfg": "give the flags on the command line (or an @file), so each one is checked",
}
"""Reasons for refusals users are likely to hit; every other flag outside the lists is refused as unmapped."""


def given_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> set:
    """The dests of the options written on the command line (``--flag value`` and ``--flag=value``)."""
    options = parser._option_string_actions
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        action = options.get(token.split("=", 1)[0])
        if action is not None and action.dest != "help":
            given.add(action.dest)
    return given


def _option(parser: argparse.ArgumentParser, dest: str) -> str:
    for a in parser._actions:
        if a.dest == dest and a.option_strings:
            return a.option_strings[0]
    return "--" + dest.replace("_", "-")


def check_megatron_flags(given: set, ours: set, parser: argparse.ArgumentParser) -> None:
    """ArgumentError naming each given flag that is neither LongVILA's, nor mapped, nor consumed, with its reason."""
    refused: List[str] = []
    for dest in sorted(given - set(ours) - set(MAPPED) - CONSUMED):
        why = REFUSED_WHY.get(dest, "not mapped into LongVILA's model or trainer (nothing would honour it)")
        refused.append(f"{_option(parser, dest)}: {why}")
    if refused:
        raise ArgumentError("--use-megatron-training refuses " + ("this flag" if len(refused) == 1 else
                                                                  f"{len(refused)} flags") + "; drop "
                            + ("it" if len(refused) == 1 else "them") + ":\n  " + "\n  ".join(refused))


def model_flags_from_megatron(args, given: set) -> dict:
    """The given Megatron model, kernel and shape flags as training.model_flags' dests -> values."""
    out = {}
    for dest, (ours, translate) in MAPPED.items():
        if dest in given:
            out[ours] = translate(getattr(args, dest))
    return out

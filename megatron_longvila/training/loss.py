"""Loss as the exact global token mean across CP and DP ranks (and micro-batches).

Public API:
    loss_func(loss_mask, output_tensor) -> (loss_sum, num_tokens, {"lm loss": [sum, count]})
        Megatron forward_step loss function. With TransformerConfig.calculate_per_token_loss=True (required:
        validate_mmsp checks it), Megatron's DDP sums gradients over DP x CP and finalize_model_grads divides
        them by the token count all-reduced over DP x CP, so gradients are those of the global token mean.
    global_token_mean(per_token_loss, loss_mask, group=None) -> Tensor
        for loops outside Megatron's schedules: sum of this rank's masked losses / global token count; the
        sum over `group` of every rank's value (and of its gradients) is the exact global mean.
    reduce_for_logging(loss_sum, num_tokens, group=None) -> float     global mean for reports

Why not a mean per rank: MM-SP shards (and loss masks) give CP ranks different numbers of target tokens, so a
mean of per-rank means weighs tokens unequally; summing first and dividing by the global count is exact.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist

__all__ = ["loss_func", "global_token_mean", "reduce_for_logging", "dp_cp_group"]


def dp_cp_group():
    """Megatron's data-parallel group including context parallelism (where gradients are reduced)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Per-token losses [b, s_local] (GPTModel with labels) -> Megatron's (sum, count, report) triple."""
    losses = output_tensor.float()
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses.reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
    if dist.is_initialized():
        dist.all_reduce(report, group=dp_cp_group())
    return loss_sum, num_tokens, {"lm loss": report}


def global_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of the global token mean: sum(local masked losses) / (tokens counted over `group`)."""
    mask = loss_mask.float()
    count = mask.sum().detach().clone()
    if dist.is_initialized() and (group is None or dist.get_world_size(group) > 1):
        dist.all_reduce(count, group=group)
    return torch.sum(per_token_loss.float() * mask) / torch.clamp(count, min=1.0)


def reduce_for_logging(loss_sum: torch.Tensor, num_tokens: torch.Tensor, group=None) -> float:
    """Global token mean of a loss from per-rank sums and counts."""
    t = torch.stack([loss_sum.detach().float().reshape(()), num_tokens.detach().float().reshape(())])
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return float(t[0] / torch.clamp(t[1], min=1.0))

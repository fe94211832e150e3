"""The GPT-only micro-batch: a plain Megatron GPT with MM-SP attention (the `--spec` path), sharded by one plan, and
its loss function. LongVILA's own micro-batches go through batch.microbatch and the training step instead.

Sharding (the equivalent of Megatron's get_batch_on_this_cp_rank for the MM-SP layout):
    shift_labels(tokens, seq_lens) -> (labels, loss_mask)
        next-token targets inside each document; a document's last token has no target (mask 0)
    shard_batch(tokens, *, seq_lens=None, labels=None, loss_mask=None, position_ids=None, config=None, mesh=None,
                mmsp=None, seq_length=None, pad_id=0) -> ShardedBatch
        shard a full micro-batch (every CP rank holds it, as Megatron's data loader gives it) by one plan
    ShardedBatch          tokens, labels, loss_mask, position_ids ([b, s_local]), packed_seq_params, plan
    shard_batch_te_cp(tokens, *, labels=None, loss_mask=None, position_ids=None) -> dict
        the TE a2a+p2p baseline's sharding (Megatron's get_batch_on_this_cp_rank layout, single documents)

Labels are shifted on the full sequence, before sharding, so no target is lost where a shard boundary cuts
a document. Position ids (each token's position inside its own document) are sharded with the tokens and
the same plan drives RoPE in MMSPSelfAttention, so positions always match. Pad tokens of uniform plans get
token `pad_id`, label 0, loss mask 0 and position 0.

Loss (the exact global token mean across CP and DP ranks and micro-batches):
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
The token count is the number of positions with a non-zero mask, an integer: a fractional mask weighs each token's
loss but is not truncated into the count (a weighted global mean over fractional weights, exactly, is what
training.step's loss scale gives LongVILA's micro-batches).

Fixed shapes: with seq_length (needed with PP > 1 or TP sequence parallelism), a packed sequence shorter
than seq_length gets a filler document (token pad_id, loss mask 0), so every rank holds exactly
seq_length / CP tokens, which is the shape Megatron's pipeline schedules allocate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import MMSPConfig
from ..errors import BatchError
from ..parallel.mesh import MMSPMesh
from ..parallel.sharding import SequencePlan, plan_sequence
from ..parallel.state import get_mmsp_config, get_mmsp_mesh
from .packed_seq_params import MMSPPackedSeqParams

__all__ = ["ShardedBatch", "shard_batch", "shard_batch_te_cp", "shift_labels", "BatchError", "loss_func",
           "global_token_mean", "reduce_for_logging", "dp_cp_group"]


@dataclass
class ShardedBatch:
    """This CP rank's part of one micro-batch."""

    tokens: torch.Tensor
    """[b, s_local] input ids."""
    labels: torch.Tensor
    """[b, s_local] next-token targets (shifted before sharding)."""
    loss_mask: torch.Tensor
    """[b, s_local] float, 1 where the target counts in the loss."""
    position_ids: torch.Tensor
    """[b, s_local] position of each token inside its document."""
    packed_seq_params: MMSPPackedSeqParams
    """Pass to GPTModel.forward(packed_seq_params=...): carries the plan to every layer."""
    plan: SequencePlan
    """The sharding plan of this micro-batch."""


def shift_labels(tokens: torch.Tensor, seq_lens: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[b, s] tokens -> labels[t] = tokens[t+1] inside each document; loss mask 0 on each document's last token."""
    b, s = tokens.shape
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    last = [e - 1 for e in _ends(seq_lens)]
    labels[:, last] = 0  # the next token belongs to another document
    mask[:, last] = 0.0
    return labels, mask


def _ends(seq_lens):
    out, e = [], 0
    for n in seq_lens:
        e += int(n)
        out.append(e)
    return out


def shard_batch(tokens: torch.Tensor, *, seq_lens: Optional[Sequence[int]] = None,
                labels: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, config=None, mesh: Optional[MMSPMesh] = None,
                mmsp: Optional[MMSPConfig] = None, seq_length: Optional[int] = None,
                pad_id: int = 0) -> ShardedBatch:
    """Shard one full micro-batch for this CP rank.

    Args:
        tokens: [b, s] input ids of the whole micro-batch.
        seq_lens: lengths of the documents packed in each sequence (same for every row; b must be 1 for more
            than one document). None: one document of length s.
        labels, loss_mask: Megatron-style already-shifted targets and mask over the full sequence; None derives
            them with `shift_labels` (targets never cross documents).
        position_ids: [b, s] positions to shard along; None takes each token's position in its document.
        config: the model's TransformerConfig, whose MM-SP mesh and settings (`initialize_mmsp`) are used where
            `mesh` / `mmsp` are not given.
        mesh, mmsp: the MM-SP mesh and config.
        seq_length: fixed sequence length to fill up to (required with PP > 1 or sequence parallelism).
        pad_id: token id for filler and pad tokens.
    """
    if mesh is None or mmsp is None:
        if config is None:
            raise BatchError("shard_batch needs the MM-SP mesh and settings: pass config=model.config (after "
                             "initialize_mmsp(model.config)) or mesh= and mmsp=")
        mesh = get_mmsp_mesh(config) if mesh is None else mesh
        mmsp = get_mmsp_config(config) if mmsp is None else mmsp
    if tokens.dim() != 2:
        raise BatchError(f"tokens must be [b, s], got {tuple(tokens.shape)}")
    b, s = tokens.shape
    seq_lens = [s] if seq_lens is None else [int(n) for n in seq_lens]
    if sum(seq_lens) != s:
        raise BatchError(f"documents {seq_lens} cover {sum(seq_lens)} tokens, the sequence has {s}")
    if len(seq_lens) > 1 and b != 1:
        raise BatchError(f"{len(seq_lens)} packed documents with micro-batch size {b}: one plan serves one packed "
                         f"sequence; set --micro-batch-size 1")
    if labels is None:
        if loss_mask is not None:
            raise BatchError("loss_mask without labels: give both (already shifted) or neither")
        labels, loss_mask = shift_labels(tokens, seq_lens)
    elif loss_mask is None:
        loss_mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    if labels.shape != tokens.shape or loss_mask.shape != tokens.shape:
        raise BatchError(f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must match tokens "
                         f"{tuple(tokens.shape)}")
    if position_ids is None:
        position_ids = torch.cat([torch.arange(n, device=tokens.device) for n in seq_lens]).expand(b, s)
    needs_fixed = bool(mmsp.uniform_shards)
    if needs_fixed and seq_length is None:
        raise BatchError("uniform shards (PP > 1 or sequence parallelism) need seq_length: pass --seq-length so every "
                         "rank holds seq_length / CP tokens")
    if seq_length is not None:
        if s > seq_length:
            raise BatchError(f"sequence of {s} tokens is longer than --seq-length {seq_length}")
        fill = seq_length - s
        if fill:
            def cat(x, v):
                return torch.cat([x, x.new_full((b, fill), v)], dim=1)

            tokens, labels, loss_mask = cat(tokens, pad_id), cat(labels, 0), cat(loss_mask.float(), 0.0)
            position_ids = torch.cat([position_ids, torch.arange(fill, device=tokens.device).expand(b, fill)], 1)
            seq_lens = seq_lens + [fill]
    plan = plan_sequence(mesh, seq_lens, uniform=bool(mmsp.uniform_shards),
                         pad_to_multiple=mmsp.pad_to_multiple if mmsp.uniform_shards else 1)
    if seq_length is not None and needs_fixed and plan.local_len * mesh.cp_size != seq_length:
        raise BatchError(f"plan gives {plan.local_len} tokens per rank, Megatron's schedules expect "
                         f"{seq_length // mesh.cp_size}: --seq-length {seq_length} must be a multiple of CP (x TP "
                         f"with sequence parallelism)")

    def shard(x):
        return plan.shard(x, seq_dim=1)

    t, lab, lm, pos = shard(tokens), shard(labels), shard(loss_mask.float()), shard(position_ids)
    real = plan.real_lens[mesh.cp_rank]
    if real < plan.local_len:
        t[:, real:] = pad_id  # plan.shard pads with zeros; loss mask and position 0 are already right
    cu = torch.tensor(_ends(seq_lens), dtype=torch.int32)
    cu = torch.cat([cu.new_zeros(1), cu])
    params = MMSPPackedSeqParams(qkv_format="thd" if b == 1 else "sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(seq_lens), max_seqlen_kv=max(seq_lens), plan=plan)
    return ShardedBatch(tokens=t, labels=lab, loss_mask=lm, position_ids=pos, packed_seq_params=params, plan=plan)


def shard_batch_te_cp(tokens: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                      loss_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None) -> dict:
    """Baseline sharding for TE's a2a+p2p CP: Megatron's own 2*CP-chunk layout (unpacked sequences).

    Labels are shifted before sharding here too, so both paths train on the same targets.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    b, s = tokens.shape
    if labels is None:
        if loss_mask is not None:
            raise BatchError("loss_mask without labels: give both (already shifted) or neither")
        labels, loss_mask = shift_labels(tokens, [s])
    elif loss_mask is None:
        loss_mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    if position_ids is None:
        position_ids = torch.arange(s, device=tokens.device).expand(b, s).contiguous()
    return get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "loss_mask": loss_mask.float(),
                                      "position_ids": position_ids, "attention_mask": None})


def dp_cp_group():
    """Megatron's data-parallel group including context parallelism (where gradients are reduced)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Per-token losses [b, s_local] (GPTModel with labels) -> Megatron's (sum, count, report) triple."""
    losses = output_tensor.float()
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses.reshape(-1) * mask)
    # Positions that count, as an integer: mask.sum() cast to int would truncate fractional weights.
    num_tokens = (mask != 0).sum().to(torch.int)
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

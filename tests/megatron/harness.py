"""Shared pieces of the Megatron equivalence tests: a tiny Llama-style GPT, its data, and weight mapping.

Weights are a pure function of the (global) parameter name, so every TP x PP x CP layout loads the same model:
each rank slices its tensor-parallel shard out of the full tensor, and gradients are compared the same way.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Tuple

import torch

VOCAB = 64
SEQ_LENGTH = 64
NUM_LAYERS = 2
DOCS = [[13, 29, 20], [40, 22], [7, 31, 3, 21], [62]]  # packed documents per micro-batch, 62 tokens each


def make_config(tp=1, pp=1, cp=1, hier=None, sp=False, **overrides):
    from megatron.core.transformer import TransformerConfig
    import torch.nn.functional as F

    kw = dict(num_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
              ffn_hidden_size=48, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
              use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
              bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
              gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
              calculate_per_token_loss=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              context_parallel_size=cp, hierarchical_context_parallel_sizes=hier, sequence_parallel=sp,
              cp_comm_type="a2a+p2p" if cp > 1 else None)
    kw.update(overrides)
    return TransformerConfig(**kw)


def batch_tokens(dp_rank: int, micro: int) -> Tuple[torch.Tensor, List[int]]:
    docs = DOCS[(dp_rank * 2 + micro) % len(DOCS)]
    g = torch.Generator().manual_seed(1000 + 17 * dp_rank + micro)
    return torch.randint(1, VOCAB, (1, sum(docs)), generator=g), list(docs)


def sharded_batches(dp_rank: int, micro: int, seq_length: int, config):
    """This DP rank's micro-batches, sharded by the MM-SP plan (batch.gpt.shard_batch)."""
    from megatron_longvila.batch.gpt import shard_batch

    out = []
    for m in range(micro):
        tokens, docs = batch_tokens(dp_rank, m)
        out.append(shard_batch(tokens, seq_lens=docs, seq_length=seq_length, config=config))
    return out


def forward_step(it, model):
    """Megatron schedule forward step over an iterator of sharded batches, with the project's loss."""
    from functools import partial

    from megatron_longvila.batch.gpt import loss_func

    b = next(it)
    out = model(b.tokens, b.position_ids, None, labels=b.labels, packed_seq_params=b.packed_seq_params)
    return out, partial(loss_func, b.loss_mask)


def full_value(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def global_name(model, local_name: str) -> str:
    """decoder.layers.<local>. -> decoder.layers.<global>. (pipeline stages hold a slice of the layers)."""
    if local_name.startswith("decoder.layers."):
        rest = local_name[len("decoder.layers."):]
        idx, tail = rest.split(".", 1)
        layer = model.decoder.layers[int(idx)]
        return f"decoder.layers.{layer.layer_number - 1}.{tail}"
    return local_name


def tp_shard(name: str, full: torch.Tensor, param, tp_rank: int, tp: int, gated: bool) -> torch.Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated and "linear_fc1" in name:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def full_shapes_reference_names(model) -> Dict[str, Tuple]:
    return {n: tuple(p.shape) for n, p in unwrap(model).named_parameters()}


def load_weights(model, tp_rank: int, tp: int, full_shapes: Dict[str, Tuple], gated: bool = True) -> None:
    m = unwrap(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            g = global_name(m, n)
            full = full_value(g, full_shapes[g])
            p.copy_(tp_shard(g, full, p, tp_rank, tp, gated))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

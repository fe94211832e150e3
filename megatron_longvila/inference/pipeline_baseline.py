"""The baseline MM-SP inference is measured against: the model's layers split over the ranks, one active at a time.

This is what Hugging Face's `device_map="auto"` does (VILA's released inference): rank k holds layers
[k L/P, (k+1) L/P), the first also the encoder, projector and embedding, the last the final norm and the LM head.
Prefill runs the whole prompt through rank 0's layers, sends the hidden states to rank 1, and so on; every decoded
token goes through the ranks in turn. Each rank holds the KV cache of its own layers for the whole sequence.
Written here, on the same model code and attention kernels (CP = 1 on every stage), so the comparison isolates the
parallelization: weights are split (1/P each), KV is split by layer, and only one rank computes at any time.

    pipeline_generate(model, prompt, *, max_new_tokens) -> (tokens, stats)
        every rank of the pipeline-parallel group calls it (Megatron's parallel_state with PP = P, TP = CP = 1)
"""

from __future__ import annotations

import time
from typing import List, Tuple

import torch
import torch.distributed as dist

from ..batch.microbatch import plan_microbatch
from ..batch.packed_seq_params import MMSPPackedSeqParams
from ..batch.sample import MicroBatch
from ..parallel import comm
from ..parallel.mesh import single_rank_mesh
from ..parallel.sharding import plan_sequence
from ..plan.segments import Segments
from ..runtime.modules import model_device, unwrap_model
from .cache import InferenceState, ShardedKVCache
from .generate import _logits

__all__ = ["pipeline_generate"]


def _pp():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(), \
        ps.get_pipeline_model_parallel_world_size()


def _stage(m, gpt, hidden_in, params, rope, n_tokens, device, dtype):
    """Receive (except the first stage), run this stage's layers, send (except the last); returns the output."""
    group, rank, size = _pp()
    if rank > 0:
        hidden_in = torch.empty((n_tokens, 1, gpt.config.hidden_size), dtype=dtype, device=device)
        comm.recv(hidden_in, dist.get_global_rank(group, rank - 1), group)
        gpt.decoder.set_input_tensor(hidden_in)
    out = gpt.decoder(hidden_states=hidden_in, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=params)
    if rank < size - 1:
        comm.send(out.contiguous(), dist.get_global_rank(group, rank + 1), group, kind="pipeline_hidden")
    return out


def _next_token(m, gpt, out, device) -> int:
    group, rank, size = _pp()
    t = torch.zeros(1, dtype=torch.long, device=device)
    if rank == size - 1:
        t[0] = int(torch.argmax(_logits(m, gpt, out[-1:])[0]))
    comm.broadcast(t, dist.get_global_rank(group, size - 1), group, kind="next_token")
    return int(t.item())


@torch.no_grad()
def pipeline_generate(model, prompt, *, max_new_tokens: int) -> Tuple[List[int], dict]:
    """Greedy generation through the layer pipeline (see the module docstring)."""
    m = unwrap_model(model)
    gpt = m.language_model.model
    device = model_device(m)
    dtype = gpt.config.params_dtype
    mesh = single_rank_mesh()
    n = int(prompt.input_ids.numel())
    cache = ShardedKVCache(0, 1, reserve=max_new_tokens)
    state = InferenceState(cache, mesh, "prefill")
    t0 = time.perf_counter()
    plan = None
    hidden = None
    if m.pre_process:
        planned = plan_microbatch(m.visual_spec, MicroBatch.from_samples([prompt]), mesh).to(
            device, m.vision_model.conv1.weight.dtype)
        plan = planned.plan
        hidden = m.embed_inputs(planned)
    else:
        plan = plan_sequence(mesh, [n]).to(device)
    params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, max_seqlen_q=n, max_seqlen_kv=n, inference=state)
    out = _stage(m, gpt, hidden, params, gpt.rotary_pos_emb(n), n, device, dtype)
    tokens = [_next_token(m, gpt, out, device)]
    prefill_s = time.perf_counter() - t0
    state.mode = "decode"
    t0 = time.perf_counter()
    # The decode positions' rotary rows, built once (as MM-SP decode does): the comparison is of parallelizations.
    state.rope_offset = n
    rope = gpt.rotary_pos_emb(max(max_new_tokens - 1, 1), offset=n)
    for i in range(max_new_tokens - 1):
        pos = n + i
        state.position, state.owner = pos, 0
        k = cache.length
        state.segments = {k + 1: Segments([0, 1], [0, k + 1], False)}
        hidden = None
        if m.pre_process:
            hidden = m.language_model.embed(torch.tensor([tokens[-1]], device=device),
                                            torch.tensor([pos], device=device))
        params = MMSPPackedSeqParams(qkv_format="sbhd", max_seqlen_q=pos + 1, max_seqlen_kv=pos + 1, inference=state)
        out = _stage(m, gpt, hidden, params, rope, 1, device, dtype)
        cache.advance(0, pos)
        tokens.append(_next_token(m, gpt, out, device))
    return tokens, {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t0, "kv_bytes": cache.bytes()}

"""MM-SP inference: sharded-KV prefill and decode, generation and teacher-forced scoring.

    generate(model, prompts, mesh, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=None, seed=0,
             merge="all_gather") -> list of new token ids per prompt
    score(model, prompts, answers, mesh) -> list of AnswerScore     teacher-forced log-probabilities and argmax
    EmbeddingPrompt                      a prompt whose visual part is precomputed projector output (V-NIAH)
    prefill(model, prompt, mesh, reserve=0) -> Prefilled             the prompt's forward, its sharded KV cache

Every rank of the CP group (and of its TP group) calls these alike; data-parallel replicas run their own prompts.

Prefill is the MM-SP training forward without a backward: the prompt is planned like a training micro-batch
(stage 1: each rank decodes and encodes only its frames; stage 2: embeddings go to their token owners; 2D attention),
and every layer keeps this rank's K/V in the sharded cache (inference.cache). The last prompt token's owner computes
the LM head at that position only (its TP group gathers the vocabulary-parallel logits), picks the token and
broadcasts its id: sampling needs no identical random state on other ranks.

Decode: the token's embedding is replicated; every layer attends it to each rank's cache shard and merges the
partials exactly by log-sum-exp (inference.attention: one all-gather per layer by default, or two all-reduces);
decode token i is appended by CP rank i mod P. CP rank 0 then computes the logits and broadcasts the next id. Greedy
(temperature 0) or sampling (temperature, top-k, top-p). Generation ends at `eos_id` or `max_new_tokens`, decided
from the broadcast id, the same on every rank. The decode steps' rotary table is built once per prompt, for the new
tokens' positions only ([max_new_tokens - 1, head_dim], not [prompt + new tokens, head_dim] per step).

Several prompts per call are processed one after another (batch 1), each with its own cache: per decoded token and
layer a rank sends `inference.attention.decode_bytes_per_layer` bytes (all-gather: 4 (P-1) x heads x (head_dim + 1)),
whatever the context length.

Pipeline parallelism is refused (the decode loop would idle all stages but one, which is the baseline MM-SP
inference improves on); tensor parallelism composes (heads split as in training); TP sequence parallelism is
refused (one decode token cannot be split over TP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..batch.microbatch import plan_microbatch
from ..batch.packed_seq_params import MMSPPackedSeqParams
from ..batch.sample import IGNORE_INDEX, LongVILASample, MicroBatch
from ..errors import InferenceError
from ..parallel import comm
from ..parallel.mesh import MMSPMesh
from ..parallel.sharding import plan_sequence
from ..plan.segments import Segments
from ..runtime.device import host_to_device
from ..runtime.modules import model_device, unwrap_model
from .attention import MERGES
from .cache import InferenceState, ShardedKVCache

__all__ = ["generate", "score", "prefill", "EmbeddingPrompt", "AnswerScore", "Prefilled", "InferenceError"]


@dataclass
class EmbeddingPrompt:
    """A prompt whose visual tokens come as precomputed projector outputs (e.g. V-NIAH's cached frame embeddings).

    In a distributed call each rank asks `visual_rows` only for the visual tokens it holds.
    """

    input_ids: torch.Tensor
    """LongTensor [L]: text ids, with placeholder ids at the visual positions."""
    visual_positions: torch.Tensor
    """LongTensor [V]: positions in input_ids of the visual tokens, in the order of their rows."""
    visual_rows: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
    """[V, hidden] embeddings, or a function from row indices (LongTensor) to those rows [k, hidden]."""

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        if callable(self.visual_rows):
            return self.visual_rows(index)
        return self.visual_rows.index_select(0, index)


Prompt = Union[LongVILASample, EmbeddingPrompt]


@dataclass
class AnswerScore:
    """Teacher-forced scoring of one answer."""

    logprobs: List[float]
    """log p(answer token t | prompt, answer[:t]) for each answer token."""
    predicted: List[int]
    """argmax token id at each answer position."""
    margins: List[float] = field(default_factory=list)
    """top-1 minus top-2 logit at each answer position (a prediction closer than rounding is a tie)."""

    def matches(self, answer: Sequence[int]) -> bool:
        """Token-exact match of the argmax with the answer (VILA v1's V-NIAH rule)."""
        return list(self.predicted) == [int(t) for t in answer]


@dataclass
class Prefilled:
    """A prompt after prefill."""

    cache: ShardedKVCache
    """This rank's shard of the KV cache."""
    length: int
    """Prompt tokens."""
    next_token: int
    """The first new token (already broadcast)."""
    logits: Optional[torch.Tensor] = None
    """The last prompt position's full-vocabulary logits [vocab] (float32), on the rank that computed them."""
    seconds: float = 0.0
    """Wall time of the prefill on this rank."""
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# The model's parts
# --------------------------------------------------------------------------------------------------------------

def _gpt(model):
    m = unwrap_model(model)
    if not (m.pre_process and m.post_process):
        raise InferenceError("MM-SP inference runs the whole model on every rank: pipeline parallelism is not "
                             "supported for inference; load the checkpoint with --pipeline-model-parallel-size 1")
    if m.language_model.model.config.sequence_parallel:
        raise InferenceError("TP sequence parallelism cannot split one decode token: drop --sequence-parallel for "
                             "inference")
    return m, m.language_model.model


def _real_vocab(m) -> Optional[int]:
    rec = getattr(m, "record", None)
    return int(rec.llm["vocab_size"]) if rec is not None else None


def _logits(m, gpt, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [n, vocab] (float32) of final hidden states [n, 1, h], on every TP rank."""
    from megatron.core import tensor_parallel

    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    local, _ = gpt.output_layer(hidden, weight=weight)
    full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
    real = _real_vocab(m)
    full = full[:, 0].float()
    return full[:, :real] if real is not None else full


def _tp_group():
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None
    return ps.get_tensor_model_parallel_group()


def _broadcast_token(token: Optional[int], src_cp: int, mesh: MMSPMesh, device) -> int:
    """The id picked by TP rank 0 of CP rank `src_cp`, on every rank of the TP x CP group (two broadcasts)."""
    t = torch.tensor([token if token is not None else -1], dtype=torch.long, device=device)
    tp = _tp_group()
    if mesh.cp_rank == src_cp and tp is not None:
        comm.broadcast(t, dist.get_global_rank(tp, 0), tp, kind="next_token")
    if mesh.cp_size > 1:
        comm.broadcast(t, dist.get_global_rank(mesh.cp_group, src_cp), mesh.cp_group, kind="next_token")
    return int(t.item())


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    x = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.numel())).values[-1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        keep = torch.cumsum(probs, -1) - probs < top_p  # the smallest set whose mass reaches top_p
        keep[0] = True
        x = torch.full_like(x, float("-inf")).scatter(0, order[keep], sorted_x[keep])
    probs = torch.softmax(x, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _is_sampler(mesh: MMSPMesh, cp_rank: int) -> bool:
    tp = _tp_group()
    return mesh.cp_rank == cp_rank and (tp is None or dist.get_rank(tp) == 0)


# --------------------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------------------

def _planned_prompt(m, prompt: Prompt, mesh: MMSPMesh, device):
    """(plan, decoder input [s_local, 1, h]) of a prompt on this rank."""
    if isinstance(prompt, EmbeddingPrompt):
        ids = prompt.input_ids.long()
        plan = plan_sequence(mesh, [int(ids.numel())])
        if min(plan.real_lens) == 0:  # no rank may be empty (see batch.microbatch.plan_microbatch)
            plan = plan_sequence(mesh, [int(ids.numel())], uniform=True)
        plan.to(device)
        local_ids = plan.shard(ids)
        emb = m.language_model.embed(host_to_device(local_ids, device), host_to_device(plan.position_ids(), device))
        pos = prompt.visual_positions.long()
        # This rank's visual tokens: their rows in the prompt's order, placed at their local positions.
        local_of = torch.full((int(ids.numel()),), -1, dtype=torch.long)
        local_of[plan.token_index()] = torch.arange(plan.token_index().numel())
        mine = (local_of[pos] >= 0).nonzero().flatten()
        if mine.numel():
            rows = prompt.rows(mine).to(device=device, dtype=emb.dtype)
            emb = emb.index_copy(0, host_to_device(local_of[pos[mine]], device), rows.unsqueeze(1))
        return plan, emb
    if not isinstance(prompt, LongVILASample):
        raise InferenceError(f"a prompt is a LongVILASample or an EmbeddingPrompt, got {type(prompt).__name__}")
    mb = MicroBatch.from_samples([prompt])
    planned = plan_microbatch(m.visual_spec, mb, mesh)
    wanted = {}  # decode only this rank's frames (stage 1), one loader call per media item
    for f in planned.frames_encoded:
        slot = planned.batch.frames[f]
        if slot.pixels is None and slot.source is not None and slot.source[0].loader is not None:
            wanted.setdefault(id(slot.source[0]), (slot.source[0], []))[1].append((f, slot.source[1]))
    for media, frames in wanted.values():
        pixels = media.loader([k for _, k in frames])
        for (f, _), px in zip(frames, pixels):
            planned.set_pixels(f, px)
    planned.to(device, m.vision_model.conv1.weight.dtype)
    return planned.plan, m.embed_inputs(planned)


def _rope(gpt, length: int, offset: int = 0):
    """The rotary table of positions offset .. offset + length - 1 (None for a model without RoPE)."""
    return gpt.rotary_pos_emb(length, offset=offset) if getattr(gpt, "rotary_pos_emb", None) is not None else None


def _run_decoder(gpt, hidden, params, rope):
    return gpt.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=params)


def _owner_of(plan, position: int):
    for r in range(plan.cp_size):
        idx = plan.token_index(r)
        hit = (idx == position).nonzero()
        if hit.numel():
            return r, int(hit[0])
    raise InferenceError(f"position {position} is held by no rank")


@torch.no_grad()
def prefill(model, prompt: Prompt, mesh: MMSPMesh, *, reserve: int = 0, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, generator=None) -> Prefilled:
    """Run the prompt, fill this rank's KV shard, pick the first new token (see the module docstring)."""
    import time

    m, gpt = _gpt(model)
    device = model_device(m)
    t0 = time.perf_counter()
    plan, hidden = _planned_prompt(m, prompt, mesh, device)
    length = plan.total_len
    cache = ShardedKVCache(mesh.cp_rank, mesh.cp_size, reserve=reserve)
    state = InferenceState(cache, mesh, "prefill")
    params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, max_seqlen_q=length, max_seqlen_kv=length,
                                 inference=state)
    out = _run_decoder(gpt, hidden, params, _rope(gpt, length))
    owner, local = _owner_of(plan, length - 1)
    token, logits = None, None
    if mesh.cp_rank == owner:
        logits = _logits(m, gpt, out[local:local + 1])[0]
        if _is_sampler(mesh, owner):
            token = _sample(logits, temperature, top_k, top_p, generator)
    token = _broadcast_token(token, owner, mesh, device)
    return Prefilled(cache=cache, length=length, next_token=token, logits=logits, seconds=time.perf_counter() - t0,
                     extras={"owner": owner, "plan": plan})


# --------------------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _decode(model, pre: Prefilled, mesh: MMSPMesh, *, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, eos_id, generator, trace: Optional[list] = None, merge: str = "all_gather") -> List[int]:
    m, gpt = _gpt(model)
    device = model_device(m)
    cache = pre.cache
    state = InferenceState(cache, mesh, "decode")
    state.merge = merge
    tokens = [pre.next_token]
    # Decode step i runs at position length + i (i < max_new_tokens - 1): those rows only, built once.
    state.rope_offset = pre.length
    rope = _rope(gpt, max_new_tokens - 1, offset=pre.length) if max_new_tokens > 1 else None
    stop = set() if eos_id is None else ({int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id})
    for i in range(max_new_tokens - 1):
        if tokens[-1] in stop:
            break
        position = pre.length + i
        state.position, state.owner = position, i % mesh.cp_size
        n = cache.length
        # This step's local attention segments (the owner attends to one more key); device offsets once per step.
        state.segments = {k: Segments([0, 1], [0, k], False) for k in (n, n + 1) if k > 0}
        if device.type != "cpu":
            for seg in state.segments.values():
                seg.device_tensors(device)
        tok = torch.tensor([[tokens[-1]]], dtype=torch.long, device=device)
        pos = torch.tensor([[position]], dtype=torch.long, device=device)
        hidden = m.language_model.embed(tok[0], pos[0])
        params = MMSPPackedSeqParams(qkv_format="sbhd", max_seqlen_q=position + 1, max_seqlen_kv=position + 1,
                                     inference=state)
        out = _run_decoder(gpt, hidden, params, rope)
        cache.advance(state.owner, position)
        token = None
        if mesh.cp_rank == 0:
            logits = _logits(m, gpt, out)[0]
            if trace is not None:
                trace.append(logits.cpu())
            if _is_sampler(mesh, 0):
                token = _sample(logits, temperature, top_k, top_p, generator)
        tokens.append(_broadcast_token(token, 0, mesh, device))
    return tokens


def generate(model, prompts: Sequence[Prompt], mesh: MMSPMesh, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id=None, seed: int = 0,
             stats: Optional[list] = None, merge: str = "all_gather") -> List[List[int]]:
    """New token ids for each prompt (labels of LongVILASample prompts are ignored); see the module docstring.

    eos_id: an id (or a set of ids) that ends generation; it is the last id returned.
    stats: if a list, one dict per prompt is appended (prefill seconds, decode seconds, KV bytes of this rank).
    merge: the decode merge over CP, "all_gather" (one collective per layer) or "all_reduce" (two); see
    inference.attention for where each sends fewer bytes.
    """
    import time

    if max_new_tokens < 1:
        raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise InferenceError(f"temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required; got {temperature}, "
                             f"{top_k}, {top_p}")
    if merge not in MERGES:
        raise InferenceError(f"merge={merge!r}: choose one of {', '.join(MERGES)}")
    out = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(int(seed) + i)
        reserve = -(-max_new_tokens // mesh.cp_size)
        pre = prefill(model, prompt, mesh, reserve=reserve, temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=g)
        t0 = time.perf_counter()
        new = _decode(model, pre, mesh, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, eos_id=eos_id, generator=g, merge=merge)
        if stats is not None:
            stats.append({"prefill_s": pre.seconds, "decode_s": time.perf_counter() - t0, "new_tokens": len(new),
                          "prompt_tokens": pre.length, "kv_bytes": pre.cache.bytes()})
        out.append(new)
    return out


# --------------------------------------------------------------------------------------------------------------
# Teacher-forced scoring
# --------------------------------------------------------------------------------------------------------------

def _with_answer(prompt: Prompt, answer: Sequence[int]) -> Prompt:
    ans = torch.as_tensor(list(answer), dtype=torch.long)
    if isinstance(prompt, EmbeddingPrompt):
        return EmbeddingPrompt(input_ids=torch.cat([prompt.input_ids.long(), ans]),
                               visual_positions=prompt.visual_positions, visual_rows=prompt.visual_rows)
    return LongVILASample(input_ids=torch.cat([prompt.input_ids.long(), ans]),
                          labels=torch.full((prompt.input_ids.numel() + ans.numel(),), IGNORE_INDEX),
                          media=prompt.media)


@torch.no_grad()
def score(model, prompts: Sequence[Prompt], answers: Sequence[Sequence[int]], mesh: MMSPMesh) -> List[AnswerScore]:
    """Teacher-forced: one forward of prompt + answer each, logits only at the answer positions (each rank for the
    positions it holds), gathered on every rank. No KV cache is kept."""
    m, gpt = _gpt(model)
    device = model_device(m)
    out = []
    for prompt, answer in zip(prompts, answers):
        answer = [int(t) for t in answer]
        if not answer:
            raise InferenceError("score: an empty answer")
        full = _with_answer(prompt, answer)
        plan, hidden = _planned_prompt(m, full, mesh, device)
        n = plan.total_len
        params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, max_seqlen_q=n, max_seqlen_kv=n)
        h = _run_decoder(gpt, hidden, params, _rope(gpt, n))
        first = n - len(answer) - 1  # position predicting the first answer token
        idx = plan.token_index()
        rows = ((idx >= first) & (idx < n - 1)).nonzero().flatten()
        res = torch.zeros(len(answer), 3, dtype=torch.float64, device=device)
        if rows.numel():
            logits = _logits(m, gpt, h.index_select(0, host_to_device(rows, device)))
            logp = torch.log_softmax(logits, -1)
            slots = (idx[rows] - first).tolist()
            targets = torch.tensor([answer[j] for j in slots], device=device)
            res[slots, 0] = logp.gather(1, targets[:, None])[:, 0].double()
            res[slots, 1] = logits.argmax(-1).double()
            top2 = torch.topk(logits, 2, dim=-1).values
            res[slots, 2] = (top2[:, 0] - top2[:, 1]).double()
        if mesh.cp_size > 1:  # each answer position is held by exactly one rank
            comm.all_reduce(res, mesh.cp_group, kind="score_gather")
        res = res.cpu()
        out.append(AnswerScore(logprobs=res[:, 0].tolist(), predicted=[int(x) for x in res[:, 1].tolist()],
                               margins=res[:, 2].tolist()))
    return out

#!/usr/bin/env python3
"""MM-SP inference against a layer-pipeline split of the same model over the same ranks (CPU ranks, gloo).

Both run the same model (weights a function of each parameter's global name), the same prompt (text, and a video
whose frames stage 1 spreads over the MM-SP ranks) and greedy decoding, on P local CPU ranks pinned to one thread
each. MM-SP: every rank holds all weights, the prompt's tokens are sharded over a U x R mesh, each rank keeps the
KV of its tokens, and decode merges per-layer partials by log-sum-exp. Pipeline (Hugging Face's device_map
baseline): rank k holds layers k L/P .. (k+1) L/P - 1 and their KV for the whole sequence; one rank is active at a
time. Reported per mode: prefill seconds, decode tokens/s, KV-cache bytes and attention work per rank, the tokens
(equal in both), and the longest prompt that fits a per-rank memory budget by the analytic model below.
`--decode-merge` picks MM-SP's decode merge (inference.attention: one all-gather per layer, or two all-reduces);
`both` runs MM-SP once with each, side by side ("mmsp" is the all-gather, "mmsp_all_reduce" the other).

  python tools/bench_inference.py --ranks 4 --ulysses 2 --ring 2 --prompt-tokens 2048 --new-tokens 32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _shape(a):
    from megatron_longvila.models.registry import LLMShape

    return LLMShape(hidden_size=a.hidden, num_layers=a.layers, num_attention_heads=a.heads, num_query_groups=a.kv_heads,
                    ffn_hidden_size=4 * a.hidden, vocab_size=1024, rotary_base=10000, norm_epsilon=1e-6,
                    qkv_bias=True, max_position_embeddings=a.prompt_tokens + a.new_tokens + 64)


def _fill(model):
    """Weights as a function of the global parameter name (pipeline stages hold a slice of the layers)."""
    prefix = "language_model.model.decoder.layers."
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = name
            if name.startswith(prefix):
                idx, tail = name[len(prefix):].split(".", 1)
                g = f"{prefix}{model.language_model.model.decoder.layers[int(idx)].layer_number - 1}.{tail}"
            gen = torch.Generator().manual_seed(zlib.crc32(g.encode()))
            base = 1.0 if "norm" in g and g.endswith("weight") else 0.0
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen))


def _prompt(a):
    from megatron_longvila.models.longvila import LongVILASample, Media

    g = torch.Generator().manual_seed(3)
    tpf, frames = 4, a.frames
    ids = torch.randint(10, 1000, (8,), generator=g).tolist()
    pos = []
    for _ in range(frames):
        pos.append(list(range(len(ids), len(ids) + tpf)))
        ids += [5] * tpf
    ids += torch.randint(10, 1000, (max(a.prompt_tokens - len(ids), 1),), generator=g).tolist()
    media = [Media(token_positions=torch.tensor(pos), frames=torch.randn(frames, 3, 56, 56, generator=g))] if frames else []
    ids = torch.tensor(ids)
    return LongVILASample(input_ids=ids, labels=ids.clone(), media=media)


def memory_model(a, mode: str, seq: int, P: int) -> float:
    """Bytes per rank at prompt length `seq`: weights + KV cache + prefill activations (fp32, analytic).

    MM-SP: all weights; KV of seq/P tokens in every layer; activations of seq/P tokens through one layer (kept for
    the next layer only: no backward), plus the ring's held K/V block. Pipeline: 1/P of the layer weights; KV of
    all seq tokens in L/P layers; activations of seq tokens through one layer.
    """
    h, L, f = a.hidden, a.layers, 4 * a.hidden
    kvh = a.kv_heads * (a.hidden // a.heads)
    layer_w = 4 * (h * (h + 2 * kvh) + h * h + 3 * h * f + 2 * h)
    emb_w = 4 * 2 * 1024 * h
    act_per_token = 4 * (3 * h + 2 * kvh + 2 * f)  # live while one layer runs (qkv, attention out, MLP)
    kv_per_token_layer = 4 * 2 * kvh
    if mode == "mmsp":
        tokens = -(-seq // P)
        return L * layer_w + emb_w + tokens * L * kv_per_token_layer + tokens * (act_per_token + 2 * 2 * kvh * 4)
    layers = -(-L // P)
    return layers * layer_w + emb_w / 2 + seq * layers * kv_per_token_layer + seq * act_per_token


def longest_prompt(a, mode: str, P: int, budget: float) -> int:
    lo, hi = 0, 1 << 30
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_model(a, mode, mid, P) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _rank(rank, world, a, mode, merge="all_gather"):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.attention.ring import ATTENTION_STATS, reset_attention_stats
    from megatron_longvila.inference.attention import DECODE_STATS
    from megatron_longvila.models.registry import build_longvila
    from megatron_longvila.parallel import comm
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if mode == "mmsp":
        ps.initialize_model_parallel(context_parallel_size=world,
                                     hierarchical_context_parallel_sizes=[a.ulysses, a.ring])
    else:
        ps.initialize_model_parallel(pipeline_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1)
    kw = dict(context_parallel_size=world, hierarchical_context_parallel_sizes=[a.ulysses, a.ring]) \
        if mode == "mmsp" else dict(pipeline_model_parallel_size=world)
    model = build_longvila(encoder="siglip_tiny", llm=_shape(a), media_token_id=5,
                           llm_overrides={"calculate_per_token_loss": True}, **kw)
    _fill(model)
    model.eval()
    prompt = _prompt(a)
    reset_attention_stats()
    DECODE_STATS["pairs"] = 0
    comm.reset_counters()
    if mode == "mmsp":
        from megatron_longvila.inference import generate

        mesh = initialize_mmsp(model.config)
        stats = []
        tokens = generate(model, [prompt], mesh, max_new_tokens=a.new_tokens, stats=stats, merge=merge)[0]
        st = stats[0]
    else:
        from megatron_longvila.inference.pipeline_baseline import pipeline_generate

        tokens, st = pipeline_generate(model, prompt, max_new_tokens=a.new_tokens)
    work = ATTENTION_STATS["fwd_flops"] // 4 + DECODE_STATS["pairs"]  # query-key pairs x heads
    return {"tokens": tokens, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"], "kv_bytes": st["kv_bytes"],
            "attention_pairs_heads": int(work), "comm_bytes": comm.total_bytes()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--ring", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--frames", type=int, default=8, help="video frames in the prompt (4 tokens each)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--memory-budget-gb", type=float, default=1.0, help="per-rank budget for the longest-prompt figure")
    p.add_argument("--decode-merge", choices=("all_gather", "all_reduce", "both"), default="all_gather",
                   help="MM-SP's decode merge over CP: one all-gather per layer, two all-reduces, or each in turn")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.ulysses * a.ring != a.ranks or a.layers % a.ranks:
        p.error("--ulysses x --ring must equal --ranks, and --layers must divide by --ranks (pipeline stages)")
    from megatron_longvila.parallel.launch import run_distributed

    res = {"date": time.strftime("%Y-%m-%d"), "ranks": a.ranks, "mesh": f"{a.ulysses}x{a.ring}",
           "threads_per_rank": 1, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
           "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads")}}
    merges = ["all_gather", "all_reduce"] if a.decode_merge == "both" else [a.decode_merge]
    runs = [("mmsp" if i == 0 else f"mmsp_{m}", "mmsp", m) for i, m in enumerate(merges)]
    for key, mode, merge in runs + [("pipeline", "pipeline", None)]:
        rows = run_distributed(_rank, a.ranks, a, mode, merge, timeout=3600, threads=1)
        r0 = rows[0] if mode == "mmsp" else rows[-1]
        res[key] = {"decode_merge": merge,"prefill_s": max(r["prefill_s"] for r in rows),
                     "decode_tokens_per_s": (a.new_tokens - 1) / max(max(r["decode_s"] for r in rows), 1e-9),
                     "kv_bytes_per_rank": [r["kv_bytes"] for r in rows],
                     "attention_work_per_rank": [r["attention_pairs_heads"] for r in rows],
                     "comm_bytes_per_rank": [r["comm_bytes"] for r in rows], "tokens": r0["tokens"],
                     "longest_prompt": longest_prompt(a, mode, a.ranks, a.memory_budget_gb * 2**30)}
    res["tokens_equal"] = all(res[key]["tokens"] == res["pipeline"]["tokens"] for key, _, _ in runs)
    res["prefill_speedup"] = res["pipeline"]["prefill_s"] / res["mmsp"]["prefill_s"]
    res["decode_speedup"] = res["mmsp"]["decode_tokens_per_s"] / res["pipeline"]["decode_tokens_per_s"]
    if "mmsp_all_reduce" in res:
        res["decode_speedup_all_reduce"] = (res["mmsp_all_reduce"]["decode_tokens_per_s"]
                                            / res["pipeline"]["decode_tokens_per_s"])
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

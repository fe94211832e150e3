"""MM-SP inference on gloo CPU ranks equals the single-process model (fp32).

References are computed once, in one single-rank process: the prefill logits at the last prompt position, the
prompt's K/V per layer, and greedy decoding by recomputation (each step a fresh forward over the prompt and the
tokens so far, no cache), with each step's logits. Then, in one 8-rank launch, every mesh of the issue runs as
CP groups of that world (smaller CP groups are data-parallel replicas): 1x2, 2x1, 2x2, TP2 x 2x1, 1x4, 4x1, 2x4,
4x2 with 2 KV heads, and 4x1, 4x2 with 1 KV head (GQA below U). Prompts: text of lengths 1, 2R-1, 2R, 2R+1 and 37,
and a video prompt whose 5 frames spread over the ranks (stage 1). Checked per prompt:
- prefill logits (on the rank that holds the last prompt token) within 1e-5 relative (max abs / max abs reference);
- the cache gathered over the CP group equals the single-process cache (1e-5 relative);
- greedy tokens equal the reference for 3 x CP steps; a step whose reference top-2 logits are within 1e-4 may
  differ, and is then judged by its logits (1e-5);
- byte counters during decode: no K/V, Ulysses or routing traffic at all, and the decode merge (one all-gather per
  layer) equals `decode_bytes_per_layer` x layers x steps, in exactly layers x steps calls;
- decode builds one rotary table per call, of the new tokens' positions only.
Also: teacher-forced scoring equals the reference's log-probabilities, on every mesh; a PP model is refused; both
decode merges (all-gather, two all-reduces) equal the float64 merge of every rank's partials (empty shards included),
with bytes and calls per their formula, on CP groups of 2, 3 and 4.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

RTOL = 1e-5
TIE = 1e-4
MESHES = [  # (TP, U, R, KV heads)
    (1, 1, 2, 2), (1, 2, 1, 2), (1, 2, 2, 2), (2, 2, 1, 2), (1, 1, 4, 2), (1, 4, 1, 2), (1, 2, 4, 2), (1, 4, 2, 2),
    (1, 4, 1, 1), (1, 4, 2, 1),
]


def _shape(kv):
    from megatron_longvila.models.registry import LLMS

    return replace(LLMS["tiny"], num_query_groups=kv)


def _build(kv, tp=1, cp=1, hier=None):
    from megatron_longvila.models.registry import build_longvila
    from tests.models._longvila_cases import MEDIA

    return build_longvila(encoder="siglip_tiny", llm=_shape(kv), tensor_model_parallel_size=tp,
                          context_parallel_size=cp, hierarchical_context_parallel_sizes=hier, media_token_id=MEDIA)


def _prompts(R):
    """Text prompts of lengths 1, 2R-1, 2R, 2R+1, 37 and a 5-frame video prompt."""
    from megatron_longvila.models.longvila import LongVILASample
    from tests.models._longvila_cases import _sample

    g = torch.Generator().manual_seed(100 + R)
    out = []
    for n in (1, 2 * R - 1, 2 * R, 2 * R + 1, 37):
        ids = torch.randint(10, 96, (n,), generator=g)
        out.append(LongVILASample(input_ids=ids, labels=ids.clone()))
    out.append(_sample(g, 5, 56, 4, 6, "video"))
    return out


def _steps(cp):
    return 3 * cp


def _np(t):
    return t.detach().float().cpu().numpy()


def _reference(rank, world, cases):
    """Single process: per (KV heads, R, prompt): prefill logits, cache, greedy-by-recompute tokens and logits."""
    from megatron_longvila.inference import prefill, score
    from megatron_longvila.models.longvila import LongVILASample
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from tests.models._longvila_cases import setup_megatron

    out = {}
    for kv in sorted({c[0] for c in cases}):
        setup_megatron(seed=77)
        model = _build(kv)
        out[("state", kv)] = {n: _np(p) for n, p in model.named_parameters()}
        for _, R, steps in [c for c in cases if c[0] == kv]:
            for i, prompt in enumerate(_prompts(R)):
                pre = prefill(model, prompt, single_rank_mesh())
                cache = {layer: (_np(k), _np(v)) for layer, (k, v) in pre.cache.gather(None).items()}
                tokens, logits, cur = [], [], prompt
                for _ in range(steps):
                    p = prefill(model, cur, single_rank_mesh())
                    tokens.append(p.next_token)
                    logits.append(_np(p.logits))
                    cur = LongVILASample(input_ids=torch.cat([cur.input_ids, torch.tensor([p.next_token])]),
                                         labels=torch.cat([cur.labels, torch.tensor([0])]), media=cur.media)
                answer = tokens[:3]
                sc = score(model, [prompt], [answer], single_rank_mesh())[0]
                out[(kv, R, i)] = {"prefill": _np(pre.logits), "cache": cache, "tokens": tokens, "logits": logits,
                                   "score": sc.logprobs, "answer": answer}
    return out


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if b.size else 0.0


def _mesh_world(rank, world, ref, meshes):
    from megatron.core import parallel_state as ps

    from megatron_longvila.inference import prefill, score
    from megatron_longvila.inference.attention import decode_bytes_per_layer
    from megatron_longvila.inference.generate import _decode
    from megatron_longvila.parallel import comm
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from tests.models._longvila_cases import load_from, setup_megatron

    merges = _merges(rank)
    report = []
    for tp, U, R, kv in meshes:
        cp = U * R
        setup_megatron(tp=tp, cp=cp, hier=[U, R], seed=77)
        mesh = build_mmsp_mesh(U, R)
        model = _build(kv, tp, cp, [U, R])
        state = {n: torch.from_numpy(a) for n, a in ref[("state", kv)].items()}
        load_from(model, state, tp, ps.get_tensor_model_parallel_rank())
        layers = model.language_model.model.config.num_layers
        heads_tp = model.language_model.model.config.num_attention_heads // tp
        steps = _steps(cp)
        for i, prompt in enumerate(_prompts(R)):
            r = ref[(kv, R, i)]
            row = {"mesh": (tp, U, R, kv), "prompt": i, "len": int(prompt.input_ids.numel())}
            pre = prefill(model, prompt, mesh, reserve=-(-steps // cp))
            row["prefill_err"] = _rel(_np(pre.logits), r["prefill"]) if pre.logits is not None else None
            gathered = pre.cache.gather(mesh.cp_group)
            tp_rank = ps.get_tensor_model_parallel_rank()

            def mine(ref_kv):  # this TP rank's KV heads of the reference cache [n, 1, kv, d]
                per = max(kv // tp, 1)
                start = tp_rank * kv // tp
                return ref_kv[:, :, start:start + per]

            row["cache_err"] = max(max(_rel(_np(k), mine(r["cache"][layer][0])), _rel(_np(v), mine(r["cache"][layer][1])))
                                   for layer, (k, v) in gathered.items())
            row["cache_len"] = {layer: int(k.shape[0]) for layer, (k, _) in gathered.items()}
            comm.reset_counters()
            trace, ropes = [], []
            rope_mod = model.language_model.model.rotary_pos_emb
            hook = rope_mod.register_forward_hook(lambda mod, a, kw, out: ropes.append((tuple(out.shape), kw)),
                                                  with_kwargs=True)
            try:
                got = _decode(model, pre, mesh, max_new_tokens=steps, temperature=0.0, top_k=0, top_p=1.0,
                              eos_id=None, generator=None, trace=trace)
            finally:
                hook.remove()
            row["ropes"] = [(shape[0], kw.get("offset")) for shape, kw in ropes]
            row["rope_expected"] = [(steps - 1, pre.length)]
            row["merge_calls"] = comm.counters()["calls"].get("cp/decode_gather", 0)
            row["merge_calls_expected"] = layers * (steps - 1) if cp > 1 else 0
            c = comm.counters()["bytes"]
            row["decode_bytes"] = {k: v for k, v in c.items() if not k.endswith("/next_token")}  # the id: 8 bytes
            head_dim = model.language_model.model.config.kv_channels
            row["merge_expected"] = decode_bytes_per_layer(heads_tp, head_dim, cp) * layers * (steps - 1)
            # Greedy tokens against the reference; at the first difference the reference step must be a near tie.
            verdict = "equal"
            for s, (a, b) in enumerate(zip(got, r["tokens"])):
                if a != b:
                    top2 = np.sort(r["logits"][s])[-2:]
                    verdict = f"near tie at step {s}" if top2[1] - top2[0] < TIE else f"differs at step {s}: {a} != {b}"
                    break
            row["greedy"] = verdict
            row["steps"] = len(got)
            if mesh.cp_rank == 0:  # step logits (decode steps 1..), where computed
                n = min(len(trace), len(r["logits"]) - 1)
                row["step_logit_err"] = max((_rel(_np(trace[s]), r["logits"][s + 1]) for s in range(n)
                                             if got[:s + 1] == r["tokens"][:s + 1]), default=0.0)
            sc = score(model, [prompt], [r["answer"]], mesh)[0]
            row["score_err"] = _rel(sc.logprobs, r["score"])
            report.append(row)
    return report, merges


@pytest.fixture(scope="module")
def reference():
    cases = sorted({(kv, R, _steps(U * R)) for _, U, R, kv in MESHES})
    return run_distributed(_reference, 1, cases, timeout=300)[0]


def test_mmsp_inference_equals_single_process(reference):
    results = run_distributed(_mesh_world, 8, reference, MESHES, timeout=400)
    seen = set()
    merges = [r for _, rank_merges in results for r in rank_merges]
    assert len(merges) == 2 * (2 + 3 + 4)
    for r in merges:  # both merges against the float64 merge of every rank's partials
        assert r["err"] <= 1e-6, r  # fp32 merge of O(1) values
        assert r["bytes"] == r["expected"], r
        assert r["calls"] == (1 if r["merge"] == "all_gather" else 2), r
    for rank_rows, _ in results:
        for row in rank_rows:
            key = (row["mesh"], row["prompt"])
            seen.add(key)
            if row["prefill_err"] is not None:
                assert row["prefill_err"] <= RTOL, row
            assert row["cache_err"] <= RTOL, row
            assert row["greedy"] == "equal" or row["greedy"].startswith("near tie"), row
            assert row["steps"] == 3 * row["mesh"][1] * row["mesh"][2], row
            if "step_logit_err" in row:
                assert row["step_logit_err"] <= RTOL, row
            assert row["score_err"] <= RTOL, row
            moved = {k: v for k, v in row["decode_bytes"].items() if k != "cp/decode_gather"}
            assert not any(moved.values()), (row["mesh"], moved)  # no K/V, Ulysses or routing bytes in decode
            assert row["decode_bytes"].get("cp/decode_gather", 0) == row["merge_expected"], row
            assert row["merge_calls"] == row["merge_calls_expected"], row  # one collective per layer and step
            assert row["ropes"] == row["rope_expected"], row  # one table per call: the new tokens' rows
    assert len(seen) == len(MESHES) * 6


def _pp_refused(rank, world):
    from megatron_longvila.errors import InferenceError
    from megatron_longvila.inference import generate
    from megatron_longvila.models.registry import build_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron.core import parallel_state as ps
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    model = build_longvila(encoder="siglip_tiny", llm="tiny", pipeline_model_parallel_size=2)
    try:
        generate(model, [_prompts(1)[0]], single_rank_mesh(), max_new_tokens=2)
    except InferenceError as e:
        return str(e)
    return None


def test_pipeline_parallel_inference_is_refused():
    msgs = run_distributed(_pp_refused, 2)
    assert all(m and "pipeline parallelism is not supported for inference" in m for m in msgs), msgs


def _merges(rank):
    """Both decode merges on CP groups of 2, 3 and 4 ranks (run inside the 8-rank launch, before the meshes, by
    every rank: new_group is collective): results, bytes and calls."""
    import torch.distributed as dist

    from megatron_longvila.inference.attention import MERGES, decode_bytes_per_layer, merge_partials
    from megatron_longvila.parallel import comm

    n, H, D = 1, 3, 8
    out = []
    for size in (2, 3, 4):
        group = dist.new_group(list(range(size)))  # every rank creates every group
        if rank >= size:
            continue
        comm.register_group(group, "merge_check")
        g = torch.Generator().manual_seed(size)
        o_all = torch.randn(size, n, H, D, generator=g)
        lse_all = 4 * torch.randn(size, H, n, generator=g)
        lse_all[size - 1] = float("-inf")  # the last rank's shard is empty
        o_all[size - 1] = 0
        w = torch.softmax(lse_all.double(), 0)  # [P, H, n]: the float64 reference merge
        ref = (o_all.double() * w.transpose(1, 2).unsqueeze(-1)).sum(0)
        for merge in MERGES:
            comm.reset_counters()
            got = merge_partials(o_all[rank].clone(), lse_all[rank].clone(), group, merge)
            c = comm.counters()
            out.append({"size": size, "merge": merge, "err": float((got.double() - ref).abs().max()),
                        "bytes": sum(c["bytes"].values()), "calls": sum(c["calls"].values()),
                        "expected": decode_bytes_per_layer(H, D, size, merge=merge)})
    return out


def test_decode_merge_formulas():
    from megatron_longvila.inference.attention import decode_bytes_per_layer

    # The formulas: 4 (P-1) H (D+1) against 4 x 2(P-1)/P x H (D+2); the all-gather sends fewer bytes at P = 2 only.
    H, D = 28, 128
    assert decode_bytes_per_layer(H, D, 4) == 4 * 3 * H * (D + 1)
    assert decode_bytes_per_layer(H, D, 2, merge="all_reduce") == 4 * (H + H * (D + 1))
    assert decode_bytes_per_layer(H, D, 2) < decode_bytes_per_layer(H, D, 2, merge="all_reduce")
    for P in (3, 4, 8, 64):
        assert decode_bytes_per_layer(H, D, P) > decode_bytes_per_layer(H, D, P, merge="all_reduce")
    with pytest.raises(ValueError, match="decode merge 'ring'"):
        decode_bytes_per_layer(H, D, 2, merge="ring")

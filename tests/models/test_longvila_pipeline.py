"""LongVILA through Megatron's pipeline schedule (PP=2, 1F1B) and with TP sequence parallelism equals the
single-process TP=1 / PP=1 / CP=1 model: the global token-mean loss and the gradient of every parameter (vision
encoder, projector, LLM), fp32, 1e-5 relative (max abs error <= 1e-5 * max |reference| per tensor).

The distributed runs go through Megatron's DDP (gradient sum over DP x CP), `get_forward_backward_func` (1F1B
with batch_p2p_comm=False on gloo), `finalize_model_grads` (per-token loss scaling, SP norm all-reduce, the
pipeline embedding-group step) and `batch.gpt.loss_func` on the model's reduction="none" output. Every
micro-batch is filled to SEQ tokens (uniform plan: the p2p buffers have fixed shapes); the reference is unfilled.
Each rank compares its own parameters (its PP stage's layers, its TP shard) with the matching slice of the
reference gradient; together the ranks of a replica cover every reference parameter.

Layouts (one 8-rank world): PP=2 with CP 2x1, 1x2, 2x2 and TP=2 x CP 2x1; TP=2 sequence parallelism with CP 2x1
and 1x2 (PP=1) and 1x2 x PP=2; the alignment stage (only the projector trains) at PP=2 x CP 2x1.
"""

from functools import partial

import torch

from megatron_longvila.models.longvila import MicroBatch
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.runtime.modules import model_device, unwrap_model
from megatron_longvila.batch.microbatch import plan_microbatch

from ._longvila_cases import MEDIA, _sample, tp_slice

RTOL = 1e-5
SEQ = 80  # longest micro-batch is 65 tokens; divisible by CP x TP for every layout
MICRO = 2  # micro-batches per DP rank: 1F1B at PP=2 then has a warm-up, a steady and a cool-down phase
# (TP, PP, U, R, sequence_parallel, freezing stage or None = everything trains); DP fills the rest of 8 ranks.
LAYOUTS = [(1, 2, 2, 1, False, None), (1, 2, 1, 2, False, None), (1, 2, 2, 2, False, None),
           (2, 2, 2, 1, False, None), (2, 1, 2, 1, True, None), (2, 1, 1, 2, True, None), (2, 2, 1, 2, True, None),
           # alignment stage at PP=2: only the projector (first stage) trains; the LLM stage has nothing to train
           # but must still return the input gradient through the pipeline
           (1, 2, 2, 1, False, "align")]
WORLD = 8
MAX_DP = max(WORLD // (tp * pp * u * r) for tp, pp, u, r, _, _ in LAYOUTS)


def micro_batch(dp_rank: int, m: int) -> MicroBatch:
    """Distinct micro-batches per (DP rank, index): a 6-frame video + image + text (65 tokens, 7 frames) or
    text + a 2-frame 42 px video + a 56 px image (44 tokens, 3 frames)."""
    g = torch.Generator().manual_seed(100 + 10 * dp_rank + m)
    if (dp_rank + m) % 2 == 0:
        s = [_sample(g, 6, 56, 4, 9, "video"), _sample(g, 1, 28, 1, 5, "image", sep=False),
             _sample(g, 0, 28, 1, 11, "text")]
    else:
        s = [_sample(g, 0, 28, 1, 7, "text"), _sample(g, 2, 42, 4, 6, "video"),
             _sample(g, 1, 56, 4, 8, "image", sep=False)]
    return MicroBatch.from_samples(s)


def _setup(tp=1, pp=1, cp=1, hier=None):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, hierarchical_context_parallel_sizes=hier)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)


def _build(tp=1, pp=1, cp=1, hier=None, sp=False):
    from megatron_longvila.models.registry import build_longvila

    return build_longvila(encoder="siglip_tiny", llm="tiny", tensor_model_parallel_size=tp,
                          pipeline_model_parallel_size=pp, context_parallel_size=cp,
                          hierarchical_context_parallel_sizes=hier, media_token_id=MEDIA,
                          llm_overrides=dict(sequence_parallel=sp, calculate_per_token_loss=True,
                                             batch_p2p_comm=False))


def global_name(model, name: str) -> str:
    """The reference (PP=1) name of a parameter: a stage's local LLM layer index -> its global index."""
    prefix = "language_model.model.decoder.layers."
    if not name.startswith(prefix):
        return name
    idx, tail = name[len(prefix):].split(".", 1)
    layer = model.language_model.model.decoder.layers[int(idx)]
    return f"{prefix}{layer.layer_number - 1}.{tail}"


def _rel(got, ref) -> float:
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-30) if ref.numel() else 0.0


def _reference():
    """TP=1, PP=1, CP=1 in this process: weights, and per micro-batch (sum w*CE, sum w, its gradients)."""
    from megatron_longvila.parallel.mesh import single_rank_mesh

    _setup()
    model = _build()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_micro = {}
    for d in range(MAX_DP):
        for m in range(MICRO):
            model.zero_grad(set_to_none=True)
            ce, w = model(micro_batch(d, m), single_rank_mesh(), reduction="none")
            loss_sum = (ce * w).sum()
            loss_sum.backward()
            per_micro[(d, m)] = (float(loss_sum), float(w.sum()),
                                 {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return state, per_micro


def _worker(rank, world, layouts):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.models.freezing import apply_freezing
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from megatron_longvila.batch.gpt import loss_func

    ref_state, per_micro = _reference()
    out = []
    for tp, pp, u, r, sp, freeze in layouts:
        cp = u * r
        _setup(tp, pp, cp, [u, r])
        mesh = build_mmsp_mesh(u, r)
        model = _build(tp, pp, cp, [u, r], sp)
        tp_rank = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tp_slice(n, p, ref_state[global_name(model, n)], tp, tp_rank))
        if freeze:
            apply_freezing(model, freeze)
        cfg = model.config
        assert cfg.batch_p2p_comm is False and cfg.pipeline_model_parallel_size == pp
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = ddp.no_sync
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = [micro_batch(dp_rank, m) for m in range(MICRO)]

        encoded = []

        def step(it, model):
            planned = plan_microbatch(unwrap_model(model).visual_spec, next(it), mesh, seq_length=SEQ).to(model_device(model))
            encoded.append(len(planned.frames_encoded))
            res = model(planned, reduction="none")
            if isinstance(res, tuple):  # last stage: per-token CE and weights
                ce, w = res
                return ce, partial(loss_func, w)
            return res, partial(loss_func, None)  # hidden states to the next stage; no loss here

        ddp.zero_grad_buffer()
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[ddp],
                                          num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=1)
        keys = [(d, m) for d in range(dp) for m in range(MICRO)]
        total_w = sum(per_micro[k][1] for k in keys)
        errs = {"loss": None, "vision_model": 0.0, "projector": 0.0, "language_model": 0.0}
        if ps.is_pipeline_last_stage():
            s = sum(float(x["lm loss"][0]) for x in res)
            c = sum(float(x["lm loss"][1]) for x in res)
            exp = sum(per_micro[k][0] for k in keys) / total_w
            errs["loss"] = abs(s / c - exp) / abs(exp)
        checked, worst = [], ""
        for n, p in model.named_parameters():
            g = global_name(model, n)
            exp = tp_slice(n, p, sum(per_micro[k][2][g] for k in keys) / total_w, tp, tp_rank)
            if freeze:  # the freezing stage decides what trains; only what trains has a gradient to compare
                assert p.requires_grad == n.startswith("projector."), (freeze, n)
                if not p.requires_grad:
                    continue
            e = _rel(p.main_grad, exp)
            part = n.split(".", 1)[0]
            if e > errs[part]:
                errs[part] = e
                if e > RTOL:
                    worst = g
            checked.append(g)
        out.append(dict(layout=(tp, pp, u, r, sp, freeze), errs=errs, worst=worst, checked=checked,
                        replica=(ps.get_data_parallel_rank(), ps.get_context_parallel_rank(), tp_rank),
                        first_stage=ps.is_pipeline_first_stage(),
                        frames_encoded=encoded[-1] if ps.is_pipeline_first_stage() else 0))
    ps.destroy_model_parallel()
    return {"layouts": out, "ref_names": sorted(ref_state)}


def test_longvila_pipeline_and_sequence_parallel_match_single_process():
    results = run_distributed(_worker, WORLD, LAYOUTS, timeout=300)
    ref_names = set(results[0]["ref_names"])
    failures, summary = [], {}
    for i, layout in enumerate(LAYOUTS):
        rows = [rank_out["layouts"][i] for rank_out in results]
        assert all(row["layout"] == layout for row in rows)
        assert any(row["errs"]["loss"] is not None for row in rows), f"{layout}: no rank reported a loss"
        # Every replica (one DP, CP and TP rank) covers, over its PP stages, every parameter of the reference.
        covered = {}
        for row in rows:
            covered.setdefault(row["replica"], []).extend(row["checked"])
            bad = {k: v for k, v in row["errs"].items() if v is not None and v > RTOL}
            if bad:
                failures.append(f"tp,pp,U,R,sp,freeze={layout}: {bad} (e.g. {row['worst']})")
        expected = sorted(ref_names) if layout[5] is None else sorted(n for n in ref_names if n.startswith("projector."))
        for replica, names in covered.items():
            assert sorted(names) == expected, (layout, replica, set(expected) ^ set(names))
        # Stage 1 ran on the first stage: each frame of the last micro-batch was encoded by exactly one CP rank.
        encoded = {}
        for row in rows:
            if row["first_stage"]:
                key = (row["replica"][0], row["replica"][2])  # (DP rank, TP rank): sum over the CP group
                encoded[key] = encoded.get(key, 0) + row["frames_encoded"]
        assert encoded and all(n == len(micro_batch(dp, MICRO - 1).frames) for (dp, _), n in encoded.items()), \
            (layout, encoded)
        summary[layout] = {k: max((row["errs"][k] or 0.0) for row in rows) for k in rows[0]["errs"]}
    assert not failures, "\n".join(failures)
    print(summary)

"""A tiny Llama-style GPT (GQA, RoPE, SwiGLU, QKV bias, packed documents) under MM-SP x TP x PP x DP gives the
loss, every parameter gradient and the parameters after one Adam step of the single-process CP=1 model.

Tolerance: fp32, 1e-5 relative (max abs difference / max abs reference value, per parameter).
"""


import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed
from tests.megatron import harness as H

RTOL = 1e-5
MICRO = 2  # micro-batches per DP rank: the loss is the token mean over all of them and all DP ranks
LR = 1e-2
# Adam divides by |g| + eps: with eps = 1e-8 gradients at fp32 noise level (1e-9) would get O(1) different updates
# in any two correct runs, so the step is compared with an eps that keeps it well conditioned.
EPS = 1e-4

# (tp, pp, U, R, sequence_parallel): every mesh of the issue, with TP in {1, 2} and PP in {1, 2}, in 8 ranks.
CONFIGS = [
    (1, 1, 2, 1, False), (1, 1, 1, 2, False), (1, 1, 2, 2, False), (1, 1, 4, 2, False), (1, 1, 2, 4, False),
    (2, 1, 2, 1, False), (2, 1, 1, 2, True), (2, 1, 2, 2, False),
    (1, 2, 2, 1, False), (1, 2, 1, 2, False), (1, 2, 2, 2, False),
    (2, 2, 2, 1, False), (2, 2, 1, 2, True),
]
WORLD = 8


def _setup(tp, pp, u, r, sp):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_longvila.parallel.state import initialize_mmsp

    cp = u * r
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=[u, r] if cp > 1 else None)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    cfg = H.make_config(tp=tp, pp=pp, cp=cp, hier=[u, r] if cp > 1 else None, sp=sp)
    fixed = pp > 1 or sp
    initialize_mmsp(cfg, seq_length=H.SEQ_LENGTH if fixed else None, micro_batch_size=1, packed=True)
    return cfg, (H.SEQ_LENGTH if fixed else None)


def _reference(rank, world_size):
    """CP=1, TP=1, PP=1: per micro-batch (loss sum, token count, gradient of the loss sum)."""
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.batch.gpt import shard_batch

    cfg, _ = _setup(1, 1, 1, 1, False)
    model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
    shapes = H.full_shapes_reference_names(model)
    H.load_weights(model, 0, 1, shapes)
    # numpy, not tensors: tensors crossing the process boundary travel as shared-memory handles that die
    # with this worker.
    params = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    per_micro = {}
    for d in range(WORLD):
        for m in range(MICRO):
            tokens, docs = H.batch_tokens(d, m)
            b = shard_batch(tokens, seq_lens=docs, config=cfg)
            model.zero_grad()
            out = model(b.tokens, b.position_ids, None, labels=b.labels, packed_seq_params=b.packed_seq_params)
            loss_sum = (out.float() * b.loss_mask).sum()
            loss_sum.backward()
            per_micro[(d, m)] = (float(loss_sum.detach()), float(b.loss_mask.sum()),
                                 {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters()})
    return shapes, params, per_micro


def _expected(ref, dp):
    shapes, params, per_micro = ref
    keys = [(d, m) for d in range(dp) for m in range(MICRO)]
    total = sum(per_micro[k][1] for k in keys)
    loss = sum(per_micro[k][0] for k in keys) / total
    grads = {n: torch.from_numpy(sum(per_micro[k][2][n] for k in keys)) / total for n in params}
    # One Adam step on the full model, with Megatron's OptimizerConfig default betas.
    new = {n: torch.from_numpy(p).clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.Adam(list(new.values()), lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0)
    for n, p in new.items():
        p.grad = grads[n].clone()
    opt.step()
    return loss, grads, {n: p.detach() for n, p in new.items()}


def _distributed(rank, world_size, ref, configs):
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.models.gpt import build_gpt_model

    shapes = ref[0]
    results = []
    for tp, pp, u, r, sp in configs:
        cfg, seq_length = _setup(tp, pp, u, r, sp)
        model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
        tp_rank = ps.get_tensor_model_parallel_rank()
        H.load_weights(model, tp_rank, tp, shapes)
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = ddp.no_sync
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=0.0, adam_eps=EPS,
                                                     params_dtype=torch.float32), [ddp])
        dp = ps.get_data_parallel_world_size()
        dp_rank = ps.get_data_parallel_rank()
        batches = H.sharded_batches(dp_rank, MICRO, seq_length, cfg)
        step = H.forward_step

        opt.zero_grad()
        ddp.zero_grad_buffer()
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[ddp],
                                          num_microbatches=MICRO, seq_length=seq_length or H.SEQ_LENGTH,
                                          micro_batch_size=1)
        exp_loss, exp_grads, exp_params = _expected(ref, dp)
        errs = {"loss": 0.0, "grad": 0.0, "param": 0.0}
        if res:
            s = sum(float(x["lm loss"][0]) for x in res)
            c = sum(float(x["lm loss"][1]) for x in res)
            errs["loss"] = abs(s / c - exp_loss) / abs(exp_loss)
        worst = ""
        for n, p in model.named_parameters():
            g = H.global_name(model, n)
            e = H.rel_err(p.main_grad, H.tp_shard(g, exp_grads[g], p, tp_rank, tp, True))
            if e > errs["grad"]:
                errs["grad"], worst = e, g
        ok, _, _ = opt.step()
        assert ok
        for n, p in model.named_parameters():
            g = H.global_name(model, n)
            errs["param"] = max(errs["param"], H.rel_err(p.detach(), H.tp_shard(g, exp_params[g], p, tp_rank, tp,
                                                                               True)))
        results.append(((tp, pp, u, r, sp), errs, worst, bool(res)))
    return results


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference, 1, timeout=120)[0]


def test_mmsp_gpt_matches_cp1(reference):
    out = run_distributed(_distributed, WORLD, reference, CONFIGS, timeout=280)
    failures = []
    for cfg_idx, cfg in enumerate(CONFIGS):
        rows = [rank_res[cfg_idx] for rank_res in out]
        assert any(row[3] for row in rows), f"{cfg}: no rank reported a loss"
        for row in rows:
            errs = row[1]
            if max(errs.values()) > RTOL:
                failures.append(f"tp,pp,U,R,sp={cfg}: {errs} (worst grad {row[2]})")
    assert not failures, "\n".join(failures)

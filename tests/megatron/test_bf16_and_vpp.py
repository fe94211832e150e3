"""Two compositions of MM-SP with Megatron-Core that test_equivalence.py does not cover:

1. bf16 as Megatron runs it with --bf16: bf16 parameters and activations (Float16Module), gradients
   accumulated and all-reduced in fp32 (DDP grad_reduce_in_fp32); loss and gradients (no optimizer step).
   MM-SP meshes 2x2 and 1x2 at TP 1 and 2 against the same bf16 model at CP=1.
   Tolerance: bf16 has an 8-bit significand, so two correct bf16 runs that sum in different orders differ by
   O(1e-2) in a gradient; a fixed tolerance would be either loose or flaky. Both bf16 runs are therefore
   measured against an fp32 run of the same (bf16-representable) weights, and MM-SP may be at most
   BF16_FACTOR times as far from it as CP=1 bf16 is (plus BF16_FLOOR, one bf16 rounding step, for
   parameters where CP=1 happens to land very close). The loss must agree with CP=1 bf16 within 2e-2.
2. Interleaved pipeline: PP=2 x VP=2 (4 layers, 2 chunks per rank) with MM-SP CP 2x1 and DP 2 in fp32,
   batch_p2p_comm=False (True is silently wrong on gloo with PP=2, and this test then fails):
   loss, every gradient and every parameter after one Adam step within 1e-5 of the CP=1 model.
"""


import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed
from tests.megatron import harness as H

WORLD = 8
MICRO = 2  # bf16: micro-batches per DP rank
# Interleaved: with 2 micro-batches per rank all 4 chunk-forwards fit in the warm-up and no steady-state step ever
# sends forward and backward at once; 4 reach the steady state (where batch_p2p_comm=True goes wrong on gloo).
VP_MICRO = 4
LR = 1e-2
EPS = 1e-4  # see test_equivalence.py: keeps the Adam step well conditioned at fp32 noise level
RTOL = 1e-5
VP_LAYERS = 4

BF16_LOSS_RTOL = 2e-2
BF16_FACTOR = 2.0
BF16_FLOOR = 2.0 ** -8

# (tp, U, R): MM-SP meshes 2x2 and 1x2 at TP 1 and 2, PP 1; DP fills the 8 ranks.
BF16_CONFIGS = [(1, 2, 2), (1, 1, 2), (2, 2, 2), (2, 1, 2)]
BF16_MAX_DP = WORLD // 2  # (1, 1, 2) has DP 4
# (tp, pp, vp, U, R)
VPP_CONFIG = (1, 2, 2, 2, 1)
VPP_DP = WORLD // (1 * 2 * 2)


def _setup(tp, pp, u, r, *, vp=None, bf16=False, num_layers=H.NUM_LAYERS):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_longvila.parallel.state import initialize_mmsp

    cp = u * r
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=[u, r] if cp > 1 else None)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = H.make_config(tp=tp, pp=pp, cp=cp, hier=[u, r] if cp > 1 else None, num_layers=num_layers,
                        virtual_pipeline_model_parallel_size=vp, bf16=bf16, params_dtype=dtype,
                        pipeline_dtype=dtype, batch_p2p_comm=False)
    seq_length = H.SEQ_LENGTH if pp > 1 else None
    initialize_mmsp(cfg, seq_length=seq_length, micro_batch_size=1, packed=True)
    return cfg, seq_length


def _round_to_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


def _per_micro(model, dp, batches_of, micro=MICRO):
    out = {}
    for d in range(dp):
        for m in range(micro):
            b = batches_of(d, m)
            model.zero_grad()
            loss = model(b.tokens, b.position_ids, None, labels=b.labels, packed_seq_params=b.packed_seq_params)
            loss_sum = (loss.float() * b.loss_mask).sum()
            loss_sum.backward()
            # numpy, not tensors: tensors crossing the process boundary are shared-memory handles that die with
            # this worker. Gradients go to fp32 per micro-batch, as DDP's fp32 main_grad accumulates them.
            out[(d, m)] = (float(loss_sum.detach()), float(b.loss_mask.sum()),
                           {H.global_name(_inner(model), n): p.grad.detach().float().clone().numpy()
                            for n, p in _inner(model).named_parameters()})
    return out


def _inner(model):
    return H.unwrap(model)


def _reference(rank, world_size):
    """Single process, CP=1, TP=1, PP=1: per-micro-batch losses and gradients of three models."""
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    from megatron.core.transformer.module import Float16Module

    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.batch.gpt import shard_batch

    def batches_of(d, m):
        tokens, docs = H.batch_tokens(d, m)
        return shard_batch(tokens, seq_lens=docs, config=cfg)

    ref = {}
    # fp32, 4 layers: the interleaved-pipeline reference.
    cfg, _ = _setup(1, 1, 1, 1, num_layers=VP_LAYERS)
    model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
    shapes = H.full_shapes_reference_names(model)
    H.load_weights(model, 0, 1, shapes)
    ref["vpp"] = (shapes, {n: p.detach().clone().numpy() for n, p in model.named_parameters()},
                  _per_micro(model, VPP_DP, batches_of, VP_MICRO))
    # fp32 with bf16-representable weights, 2 layers: the "truth" both bf16 runs are measured against.
    cfg, _ = _setup(1, 1, 1, 1)
    model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
    shapes = H.full_shapes_reference_names(model)
    H.load_weights(model, 0, 1, shapes)
    _round_to_bf16(model)
    ref["fp32"] = (shapes, None, _per_micro(model, BF16_MAX_DP, batches_of))
    # bf16 at CP=1, built and wrapped as Megatron does with --bf16.
    cfg, _ = _setup(1, 1, 1, 1, bf16=True)
    model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
    H.load_weights(model, 0, 1, shapes)
    model = Float16Module(cfg, model)
    ref["bf16"] = (shapes, None, _per_micro(model, BF16_MAX_DP, batches_of))
    return ref


def _mean(per_micro, dp, micro=MICRO):
    keys = [(d, m) for d in range(dp) for m in range(micro)]
    total = sum(per_micro[k][1] for k in keys)
    loss = sum(per_micro[k][0] for k in keys) / total
    names = per_micro[keys[0]][2].keys()
    grads = {n: torch.from_numpy(sum(per_micro[k][2][n] for k in keys)) / total for n in names}
    return loss, grads


def _adam_step(params, grads):
    """One Adam step on the full model with Megatron's OptimizerConfig default betas."""
    new = {n: torch.from_numpy(p).clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.Adam(list(new.values()), lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0)
    for n, p in new.items():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in new.items()}


def _train_step(cfg, chunks, seq_length, *, bf16, micro=MICRO):
    """Megatron's DDP + schedule + optimizer on this rank's model chunks; returns (global loss or None, opt)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func


    # With --bf16 Megatron accumulates and all-reduces gradients in fp32 (accumulate_allreduce_grads_in_fp32);
    # chunks after the first get one bucket each, as Megatron's trainer builds them.
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16)
    ddps = [DistributedDataParallel(cfg, ddp_cfg, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    # bf16 compares gradients only: megatron-core's Float16OptimizerWithFloat16Params insists on CUDA tensor
    # types, which the CPU runtime does not fake for it.
    opt = None if bf16 else get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0,
                                                                   clip_grad=0.0, adam_eps=EPS,
                                                                   params_dtype=torch.float32), ddps)
    dp_rank = ps.get_data_parallel_rank()
    batches = H.sharded_batches(dp_rank, micro, seq_length, cfg)
    step = H.forward_step

    for d in ddps:
        d.zero_grad_buffer()
    # Every chunk draws from its own iterator over the same micro-batches (the interleaved schedule's contract).
    its = [iter(batches) for _ in ddps]
    res = get_forward_backward_func()(forward_step_func=step, data_iterator=its if len(ddps) > 1 else its[0],
                                      model=ddps, num_microbatches=micro, seq_length=seq_length or H.SEQ_LENGTH,
                                      micro_batch_size=1)
    loss = None
    if res:
        loss = sum(float(x["lm loss"][0]) for x in res) / sum(float(x["lm loss"][1]) for x in res)
    return loss, opt


def _grads(chunks, tp_rank, tp):
    """{global name: (this rank's fp32 main_grad, param)} over all chunks."""
    out = {}
    for c in chunks:
        m = _inner(c)
        for n, p in m.named_parameters():
            out[H.global_name(m, n)] = (p.main_grad.detach().float(), p)
    return out


def _distributed(rank, world_size, ref):
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from megatron_longvila.models.gpt import build_gpt_model

    report = {}
    # --- interleaved pipeline, fp32 -----------------------------------------------------------------------
    tp, pp, vp, u, r = VPP_CONFIG
    cfg, seq_length = _setup(tp, pp, u, r, vp=vp, num_layers=VP_LAYERS)
    shapes, params, per_micro = ref["vpp"]
    chunks = [build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH, vp_stage=i)
              for i in range(vp)]
    tp_rank = ps.get_tensor_model_parallel_rank()
    for c in chunks:
        H.load_weights(c, tp_rank, tp, shapes)
    loss, opt = _train_step(cfg, chunks, seq_length, bf16=False, micro=VP_MICRO)
    dp = ps.get_data_parallel_world_size()
    exp_loss, exp_grads = _mean(per_micro, dp, VP_MICRO)
    exp_params = _adam_step(params, exp_grads)
    errs = {"loss": None if loss is None else abs(loss - exp_loss) / abs(exp_loss), "grad": 0.0, "param": 0.0}
    grads = _grads(chunks, tp_rank, tp)
    worst = ""
    for g, (grad, p) in grads.items():
        e = H.rel_err(grad, H.tp_shard(g, exp_grads[g], p, tp_rank, tp, True))
        if e > errs["grad"]:
            errs["grad"], worst = e, g
    ok, _, _ = opt.step()
    assert ok
    for g, (_, p) in grads.items():
        errs["param"] = max(errs["param"], H.rel_err(p.detach(), H.tp_shard(g, exp_params[g], p, tp_rank, tp, True)))
    # Which global layers each chunk holds: interleaving gives pipeline rank p layers p and p + PP.
    layout = (ps.get_pipeline_model_parallel_rank(),
              [[layer.layer_number - 1 for layer in _inner(c).decoder.layers] for c in chunks])
    report["vpp"] = (errs, worst, sorted(grads), layout)

    # --- bf16 -----------------------------------------------------------------------------------------------
    shapes = ref["fp32"][0]
    for tp, u, r in BF16_CONFIGS:
        cfg, seq_length = _setup(tp, 1, u, r, bf16=True)
        model = build_gpt_model(cfg, vocab_size=H.VOCAB, max_sequence_length=H.SEQ_LENGTH)
        tp_rank = ps.get_tensor_model_parallel_rank()
        H.load_weights(model, tp_rank, tp, shapes)
        model = Float16Module(cfg, model)
        seen = []  # dtypes reaching MM-SP's core attention: the bf16 run must really attend in bf16
        hook = model.module.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(
            lambda mod, args: seen.append(tuple(a.dtype for a in args[:3])))
        loss, _ = _train_step(cfg, [model], seq_length, bf16=True)
        hook.remove()
        assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
        dp = ps.get_data_parallel_world_size()
        f_loss, f_grads = _mean(ref["fp32"][2], dp)
        b_loss, b_grads = _mean(ref["bf16"][2], dp)
        rows = {}
        for g, (grad, p) in _grads([model], tp_rank, tp).items():
            fp32 = H.tp_shard(g, f_grads[g], p, tp_rank, tp, True)
            cp1 = H.tp_shard(g, b_grads[g], p, tp_rank, tp, True)
            rows[g] = (H.rel_err(grad, fp32), H.rel_err(cp1, fp32), H.rel_err(grad, cp1))
        report[(tp, u, r)] = (None if loss is None else (loss, b_loss, f_loss), rows)
    return report


@pytest.fixture(scope="module")
def results():
    ref = run_distributed(_reference, 1, timeout=120)[0]
    return run_distributed(_distributed, WORLD, ref, timeout=240)


def test_interleaved_pipeline_matches_cp1(results):
    """PP=2 x VP=2 x MM-SP CP 2x1 x DP 2, fp32: loss, gradients, parameters after one Adam step."""
    names = set()
    losses = 0
    failures = []
    for rank, rep in enumerate(results):
        errs, worst, rank_names, (pp_rank, chunk_layers) = rep["vpp"]
        names.update(rank_names)
        assert chunk_layers == [[pp_rank], [pp_rank + 2]], f"rank {rank}: not interleaved: {chunk_layers}"
        if errs["loss"] is not None:
            losses += 1
        if max(v for v in errs.values() if v is not None) > RTOL:
            failures.append(f"rank {rank}: {errs} (worst grad {worst})")
    assert losses, "no rank reported a loss"
    # Every layer of the 4 was held by some rank's chunk (gradients of all of them were compared).
    assert {f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(VP_LAYERS)} <= names
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("mesh", BF16_CONFIGS, ids=lambda c: f"tp{c[0]}-{c[1]}x{c[2]}")
def test_bf16_matches_cp1_bf16(results, mesh):
    failures = []
    losses = [rep[mesh][0] for rep in results if rep[mesh][0] is not None]
    assert losses, "no rank reported a loss"
    for mmsp_loss, cp1_loss, _ in losses:
        if abs(mmsp_loss - cp1_loss) / abs(cp1_loss) > BF16_LOSS_RTOL:
            failures.append(f"loss {mmsp_loss} vs CP=1 bf16 {cp1_loss}")
    for rank, rep in enumerate(results):
        for g, (e_mmsp, e_cp1, _) in rep[mesh][1].items():
            if e_mmsp > BF16_FACTOR * e_cp1 + BF16_FLOOR:
                failures.append(f"rank {rank} {g}: MM-SP bf16 is {e_mmsp:.2e} from fp32, CP=1 bf16 {e_cp1:.2e}")
    assert not failures, "\n".join(failures)

"""Activation recompute and offload change memory, not results: with every setting, the loss and every gradient
(vision encoder, projector, LLM) equal the run without them, on a 2x2 MM-SP mesh with PP=2 and with TP=2 (sequence
parallel), through Megatron's DDP and schedule (1F1B at PP=2, batch_p2p_comm=False), fp32 on gloo.

Every setting runs inside one 8-rank launch per mesh, from the same weights and micro-batches. Equal results alone
would also pass if a setting were silently ignored, so each run also counts how often every transformer layer, core
attention and MLP ran: a recomputed module runs twice per micro-batch (the forward, and again in the backward), the
others once; and an offloading run must have moved bytes to the host and hold none once the backward is done.
"""

from dataclasses import replace
from functools import partial

import pytest
import torch

from megatron_longvila.models.longvila import MicroBatch
from megatron_longvila.models.offload import ActivationMemoryConfig, RecomputeConfig
from megatron_longvila.errors import OffloadError
from megatron_longvila.parallel.launch import run_distributed

from tests.models._longvila_cases import MEDIA, _sample

TOL = 1e-6
SEQ = 80  # longest micro-batch is 65 tokens; divisible by CP x TP
MICRO = 2
LLM_LAYERS = 4  # two per stage at PP=2, so uniform groups of 2 and block 1 differ from "every layer"


def _v(**kw):
    return RecomputeConfig(flag_prefix="--vision-recompute", **kw)


SETTINGS = {
    "none": ActivationMemoryConfig(),
    "selective": ActivationMemoryConfig(llm=RecomputeConfig(granularity="selective"),
                                        vision=_v(granularity="selective")),
    "selective_mlp": ActivationMemoryConfig(llm=RecomputeConfig(granularity="selective", modules=("core_attn", "mlp")),
                                            vision=_v(granularity="selective")),
    "full_uniform_1": ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method="uniform", num_layers=1),
                                             vision=_v(granularity="full", method="uniform", num_layers=1)),
    "full_uniform_2": ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method="uniform", num_layers=2),
                                             vision=_v(granularity="full", method="uniform", num_layers=2)),
    "full_block_1": ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method="block", num_layers=1),
                                           vision=_v(granularity="full", method="block", num_layers=1)),
    "offload": ActivationMemoryConfig(offload=True),
    "offload_full": ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method="uniform", num_layers=1),
                                           vision=_v(granularity="full", method="uniform", num_layers=1), offload=True),
    "offload_selective": ActivationMemoryConfig(llm=RecomputeConfig(granularity="selective"),
                                                vision=_v(granularity="selective"), offload=True),
}


def micro_batch(m: int) -> MicroBatch:
    g = torch.Generator().manual_seed(300 + m)
    if m % 2 == 0:
        s = [_sample(g, 6, 56, 4, 9, "video"), _sample(g, 1, 28, 1, 5, "image", sep=False),
             _sample(g, 0, 28, 1, 11, "text")]
    else:
        s = [_sample(g, 0, 28, 1, 7, "text"), _sample(g, 2, 42, 4, 6, "video"),
             _sample(g, 1, 56, 4, 8, "image", sep=False)]
    return MicroBatch.from_samples(s)


def _recomputed(setting: RecomputeConfig, index: int, layers: int) -> dict:
    """How many times per micro-batch layer `index` (of a stage's `layers`), its core attention and its MLP run."""
    full = setting.granularity == "full" and index < setting.recomputed_layers(layers)
    sel = set(setting.modules) if setting.granularity == "selective" else set()
    return {"layer": 2 if full else 1, "core": 2 if full or "core_attn" in sel else 1,
            "mlp": 2 if full or "mlp" in sel else 1}


def _counters(model):
    """Forward calls of every transformer layer, core attention and MLP, by (stack, layer index, part)."""
    counts = {}

    def hook(key, *_):
        counts[key] = counts.get(key, 0) + 1

    stacks = {"llm": model.language_model.model.decoder}
    if model.vision_model is not None:
        stacks["vision"] = model.vision_model.decoder
    for stack, block in stacks.items():
        for i, layer in enumerate(block.layers):
            layer.register_forward_hook(partial(hook, (stack, i, "layer")))
            layer.self_attention.core_attention.register_forward_hook(partial(hook, (stack, i, "core")))
            layer.mlp.register_forward_hook(partial(hook, (stack, i, "mlp")))
    return counts, {k: len(b.layers) for k, b in stacks.items()}


def _worker(rank, world, tp, pp, u, r, names):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.models.offload import offloads_of
    from megatron_longvila.models.registry import LLMS, build_longvila
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime
    from megatron_longvila.batch.gpt import loss_func
    from megatron_longvila.runtime.modules import model_device, unwrap_model
    from megatron_longvila.batch.microbatch import plan_microbatch

    enable_cpu_runtime()
    cp = u * r
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, hierarchical_context_parallel_sizes=[u, r])
    mesh = build_mmsp_mesh(u, r)
    sp = tp > 1
    weights, results = None, {}
    for name in names:
        setting = SETTINGS[name]
        torch.manual_seed(1234)
        model_parallel_cuda_manual_seed(1234)
        model = build_longvila(encoder="siglip_tiny", llm=replace(LLMS["tiny"], num_layers=LLM_LAYERS),
                               tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               context_parallel_size=cp, hierarchical_context_parallel_sizes=[u, r],
                               media_token_id=MEDIA, activation_memory=setting,
                               llm_overrides=dict(sequence_parallel=sp, calculate_per_token_loss=True,
                                                  batch_p2p_comm=False))
        with torch.no_grad():
            if weights is None:
                weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        counts, layers = _counters(model)
        cfg = model.config
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = ddp.no_sync

        def step(it, model):
            planned = plan_microbatch(unwrap_model(model).visual_spec, next(it), mesh, seq_length=SEQ).to(model_device(model))
            res = model(planned, reduction="none")
            if isinstance(res, tuple):
                ce, w = res
                return ce, partial(loss_func, w)
            return res, partial(loss_func, None)

        ddp.zero_grad_buffer()
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([micro_batch(m) for m in
                                                                                      range(MICRO)]),
                                          model=[ddp], num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=1)
        loss = None
        if ps.is_pipeline_last_stage():
            loss = sum(float(x["lm loss"][0]) for x in out) / sum(float(x["lm loss"][1]) for x in out)
        offload = {k: (o.stats.bytes_offloaded, o.stats.bytes_reloaded, o.stats.bytes_on_host)
                   for k, o in offloads_of(model).items()}
        results[name] = dict(loss=loss, grads={n: p.main_grad.detach().clone() for n, p in model.named_parameters()
                                               if p.requires_grad},
                             counts=dict(counts), layers=layers, offload=offload,
                             checkpointing={"llm": cfg.recompute_granularity,
                                            "vision": (model.vision_model.config.recompute_granularity
                                                       if model.vision_model is not None else None)})
    ps.destroy_model_parallel()
    base = results["none"]
    report = {}
    for name in names:
        got = results[name]
        setting = SETTINGS[name]
        loss_err = None if base["loss"] is None else abs(got["loss"] - base["loss"]) / abs(base["loss"])
        grad_err = {}
        for n, g in base["grads"].items():
            ref = g.abs().max().clamp_min(1e-30)
            grad_err[n] = float((got["grads"][n] - g).abs().max() / ref)
        # Each module ran as often as its setting says, relative to the run without recompute.
        count_bad = []
        for (stack, i, part), n in base["counts"].items():
            factor = _recomputed(getattr(setting, stack), i, got["layers"][stack])[part]
            if got["counts"].get((stack, i, part)) != factor * n:
                count_bad.append((stack, i, part, n, got["counts"].get((stack, i, part))))
        report[name] = dict(loss_err=loss_err, worst_grad=max(grad_err.items(), key=lambda kv: kv[1]),
                            grads=len(grad_err), count_bad=count_bad, offload=got["offload"],
                            vision=any(k[0] == "vision" for k in base["counts"]),
                            checkpointing=got["checkpointing"])
    return report


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1)], ids=["2x2_pp2", "2x2_tp2_sp"])
def test_recompute_and_offload_equal_the_run_without(tp, pp):
    u = r = 2
    names = list(SETTINGS)
    reports = run_distributed(_worker, tp * pp * u * r, tp, pp, u, r, names, timeout=300)
    failures = []
    assert any(rep["none"]["vision"] for rep in reports), "no rank ran the vision encoder"
    for rank, rep in enumerate(reports):
        for name in names:
            row = rep[name]
            if row["loss_err"] is not None and row["loss_err"] > TOL:
                failures.append(f"rank {rank} {name}: loss relative error {row['loss_err']:.2e}")
            if row["worst_grad"][1] > TOL:
                failures.append(f"rank {rank} {name}: gradient {row['worst_grad'][0]} relative error "
                                f"{row['worst_grad'][1]:.2e}")
            if row["count_bad"]:
                failures.append(f"rank {rank} {name}: modules ran other than the setting says (stack, layer, part, "
                                f"without, with): {row['count_bad']}")
            setting = SETTINGS[name]
            if setting.offload:
                for stack, (moved, back, held) in row["offload"].items():
                    if moved <= 0 or back <= 0 or held != 0:
                        failures.append(f"rank {rank} {name}: {stack} offload moved {moved} B, reloaded {back} B, "
                                        f"still holds {held} B after the backward")
                if "llm" not in row["offload"] or (row["vision"] and "vision" not in row["offload"]):
                    failures.append(f"rank {rank} {name}: offload missing on a stack: {sorted(row['offload'])}")
            elif row["offload"]:
                failures.append(f"rank {rank} {name}: offload installed without the setting")
            assert row["checkpointing"]["llm"] == setting.llm.granularity
    assert any(rep["none"]["loss_err"] is not None for rep in reports)
    assert not failures, "\n".join(failures)


def _select_layer_worker(rank, world):
    """An encoder that runs only its first layers (VILA's select_layer -2) gets per-layer checkpoints."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.models.registry import ENCODERS, build_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    from tests.models._longvila_cases import micro_batch as case

    enable_cpu_runtime()
    ps.initialize_model_parallel()
    enc = replace(ENCODERS["siglip_tiny"], num_layers=3, select_layer=-2, apply_post_layernorm=False)
    out = {}
    weights = None
    for name, setting in (("none", ActivationMemoryConfig()),
                          ("full", ActivationMemoryConfig(vision=_v(granularity="full", method="uniform",
                                                                    num_layers=1))),
                          ("block", ActivationMemoryConfig(vision=_v(granularity="full", method="block",
                                                                     num_layers=1), offload=True))):
        torch.manual_seed(1)
        model_parallel_cuda_manual_seed(1)
        model = build_longvila(encoder=enc, llm="tiny", media_token_id=MEDIA, activation_memory=setting)
        with torch.no_grad():
            if weights is None:
                weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        calls = [0] * 3
        for i, layer in enumerate(model.vision_model.decoder.layers):  # inside the layer: runs again when recomputed
            layer.self_attention.core_attention.register_forward_hook(
                lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        loss = model(case("seven"), single_rank_mesh())
        loss.backward()
        out[name] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     calls)
    try:
        build_longvila(encoder=enc, llm="tiny", media_token_id=MEDIA, activation_memory=ActivationMemoryConfig(
            vision=_v(granularity="full", method="uniform", num_layers=2)))
        refused = None
    except OffloadError as e:
        refused = str(e)
    ps.destroy_model_parallel()
    base = out["none"]
    errs = {k: max(float((v[1][n] - base[1][n]).abs().max()) for n in base[1]) for k, v in out.items()}
    return dict(errs=errs, loss=[v[0] for v in out.values()], calls={k: v[2] for k, v in out.items()},
                names=[sorted(v[1]) == sorted(base[1]) for v in out.values()], refused=refused)


def test_select_layer_encoder_recomputes_per_layer():
    res = run_distributed(_select_layer_worker, 1, timeout=120)[0]
    assert all(res["names"])
    assert max(res["errs"].values()) <= TOL, res["errs"]
    assert len(set(res["loss"])) == 1, res["loss"]
    n = res["calls"]["none"][0]
    assert n >= 1 and res["calls"]["none"] == [n, n, 0]  # the third layer is kept, never run
    assert res["calls"]["full"] == [2 * n, 2 * n, 0]
    assert res["calls"]["block"] == [2 * n, n, 0]
    assert res["refused"] and "--vision-recompute-num-layers 1" in res["refused"]


def test_settings_refused_at_start_up():
    """Misconfigurations fail before any model exists, naming the flag."""
    from megatron_longvila.errors import ArgumentError
    from megatron_longvila.training.arguments import parse_args

    base = ["--train-iters", "1", "--data-path", "x.jsonl", "--global-batch-size", "1"]
    for extra, flag in ((["--recompute-granularity", "full"], "--recompute-method"),
                        (["--recompute-granularity", "full", "--recompute-method", "block"], "--recompute-num-layers"),
                        (["--recompute-method", "uniform", "--recompute-num-layers", "1"], "--recompute-granularity"),
                        (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
                         "--recompute-num-layers"),
                        (["--recompute-granularity", "selective", "--recompute-modules", "moe"], "--recompute-modules"),
                        (["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
                         "--vision-recompute-modules"),
                        (["--recompute-granularity", "selective", "--recompute-modules", "layernorm",
                          "--vision-recompute-granularity", "none"], "--recompute-modules layernorm")):
        with pytest.raises(ArgumentError, match=flag):
            parse_args(base + extra)
    a = parse_args(base + ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp",
                           "--vision-recompute-granularity", "full", "--vision-recompute-method", "block",
                           "--vision-recompute-num-layers", "2", "--cpu-offload-activations"])
    from megatron_longvila.models.offload import activation_memory_from_args

    m = activation_memory_from_args(a)
    assert m.llm.modules == ("core_attn", "mlp") and m.vision.granularity == "full" and m.offload
    assert parse_args(base + ["--recompute-activations"]).recompute_granularity == "selective"
    # Layer counts are checked when the model is built (the shape may come from a checkpoint).
    with pytest.raises(OffloadError, match="not a multiple of 3"):
        RecomputeConfig(granularity="full", method="uniform", num_layers=3).validate(28, "LLM")


def _megatron_lm_rank(rank, world, manifest, extra):
    """A tiny LongVILA through megatron.training (as tests/training/test_megatron_lm.py runs it); returns the losses
    and what the built model's configs and offload hooks say."""
    import os
    import sys

    from megatron_longvila.models.offload import offloads_of
    from megatron_longvila.training import megatron_lm

    from .example_script import load_example_script
    from .test_megatron_lm import MEGATRON_LM, _argv, record_megatron_losses

    sys.path.insert(0, MEGATRON_LM)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    mod = load_example_script()
    megatron_lm.enable_megatron_training_on_cpu()
    losses = record_megatron_losses()
    try:
        mod.main(_argv(manifest) + ["--use-megatron-training"] + list(extra))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    model = mod._STATE["step"].model
    return {"losses": losses, "llm": model.config.recompute_granularity,
            "vision": model.vision_model.config.recompute_granularity if model.vision_model is not None else None,
            "offload": sorted(offloads_of(model))}


@pytest.mark.skipif(not __import__("os").environ.get("MEGATRON_LM_PATH"),
                    reason="needs a Megatron-LM checkout: set MEGATRON_LM_PATH (docs/TRAINING.md)")
def test_megatron_training_takes_the_recompute_flags(tmp_path):
    """Under --use-megatron-training Megatron's own --recompute-* flags (and LongVILA's offload flag) reach both
    TransformerConfigs, and the losses equal the run without them; Megatron's TE-only offloading is refused."""
    from .example_script import load_example_script

    manifest = load_example_script().write_demo_dataset(str(tmp_path / "data"), num_videos=12)
    flags = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
             "--cpu-offload-activations"]
    plain = run_distributed(_megatron_lm_rank, 4, manifest, [], timeout=280)
    memory = run_distributed(_megatron_lm_rank, 4, manifest, flags, timeout=280)
    assert all(r["llm"] is None and r["offload"] == [] for r in plain)
    assert all(r["llm"] == "full" and r["vision"] == "full" and r["offload"] == ["llm", "vision"] for r in memory)
    a, b = plain[-1]["losses"], memory[-1]["losses"]
    print(f"\nwithout: {a}\nwith {' '.join(flags)}: {b}")
    assert sorted(a) == sorted(b) and a
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-6 * abs(a[it]), (it, a[it], b[it])
    with pytest.raises(Exception, match="--cpu-offload-activations"):
        run_distributed(_megatron_lm_rank, 4, manifest, ["--cpu-offloading-num-layers", "1"], timeout=200)

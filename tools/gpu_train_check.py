#!/usr/bin/env python3
"""The training step on one GPU: device placement, host syncs, numerics, kernel schedule, overhead and memory.

Sections (each writes its part of one JSON object; `--only a,b` runs some of them):
  a  a LongVILA step in bf16 with the `torch_cuda` kernel at a tiny shape (head dims multiples of 8) and at about
     1B parameters (SigLIP so400m + a 0.8B LLM), forward and backward under torch.cuda.set_sync_debug_mode("error")
     (the model's calls only; one warm-up step first): any host synchronization inside the model raises
  b  tiny shape: GPU fp32 (`math` kernel) against CPU fp32 (a subprocess with CUDA hidden) at 1e-5 relative, and
     GPU bf16 against GPU fp32 within relative L2 2e-2 (per-token losses and every gradient)
  c  one ring rank's zigzag block schedule against one fused causal call (tools/gpu_check.py; goal >= 0.95)
  d  the MM-SP layer spec at CP=1 against megatron-core's local GPT layer spec whose core attention is the same
     flash kernel, forward + backward of a 1-document sequence (goal: <= 2% overhead)
  e  peak memory per token of one Llama-3-8B-shaped layer (MM-SP spec, bf16), forward + backward
  f  (Transformer Engine) the tiny LongVILA step built with --transformer-impl transformer_engine (TE layers for the
     LLM, the encoder and the projector; MM-SP's ring blocks on TE's fused kernel) in bf16, host syncs as errors, its
     per-token losses against the same weights in the local spec (goal: relative L2 <= 2e-2)
  g  (Transformer Engine) FP8 attention under CP: a 2x2 MM-SP mesh of ranks sharing the GPU on the te_fp8 kernel
     against float64 attention (goal: relative error <= 0.1)
Each section's result is judged against its goal on the GPU (tools/gpu_sections.py): the tool exits 1 when a section
raises or misses its goal, after running the others; f and g skip with the reason where TE does not import.

  python tools/gpu_train_check.py --json                 # on a CUDA machine (needs megatron-core)
  python tools/gpu_train_check.py --dry-run --json       # anywhere: the plan, and section a's tiny step on CPU

Weights are a function of each parameter's name (seeded), so the CPU and GPU models are the same model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from gpu_sections import Goal, Section, emit, run_sections  # noqa: E402

SECTIONS = {"a": 110, "b": 40, "c": 60, "d": 45, "e": 35, "f": 40, "g": 40}
"""Planned seconds per section on an H200 (start-up of the process included in a)."""

TINY_LLM = dict(hidden_size=256, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=512,
                vocab_size=1000, rotary_base=10000, norm_epsilon=1e-6, qkv_bias=True, max_position_embeddings=4096)
TINY_VISION = dict(image_size=56, patch_size=14, hidden_size=128, num_layers=2, num_attention_heads=2,
                   ffn_hidden_size=256)
BIG_LLM = dict(hidden_size=2048, num_layers=16, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5504,
               vocab_size=32000, rotary_base=1000000, norm_epsilon=1e-6, qkv_bias=True,
               max_position_embeddings=8192)
MEDIA = 3


# --------------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------------

def _init(device: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device == "cpu":
        from megatron_longvila.runtime.cpu import enable_cpu_runtime

        enable_cpu_runtime()
    if not dist.is_initialized():
        init = os.path.join(tempfile.mkdtemp(), "pg")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init}", rank=0,
                                world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


# Transformer Engine fuses a layer's norm into the next linear: its parameters are named after the linear. Seeding
# by the local spec's names makes a TE model and a local one the same model.
_TE_NAMES = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
             ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


def canonical_name(name: str) -> str:
    for te, local in _TE_NAMES:
        name = name.replace(te, local)
    return name


def _build(llm: dict, vision: dict, dtype: torch.dtype, device: str, backend: str, use_te: bool = False):
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.config import mmsp_config_from_megatron
    from megatron_longvila.models.registry import LLMShape, build_longvila
    from megatron_longvila.models.vision import VisionConfig

    model = build_longvila(encoder=VisionConfig(**vision), llm=LLMShape(**llm), params_dtype=dtype,
                           media_token_id=MEDIA, use_te=use_te,
                           llm_overrides={"calculate_per_token_loss": True, "bf16": dtype == torch.bfloat16})
    if device == "cuda":
        model.cuda()
    cfg = mmsp_config_from_megatron(model.config)
    cfg.attention_backend = backend
    initialize_mmsp(model.config, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            name = canonical_name(name)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            base = 1.0 if ("norm" in name or "layernorm" in name) and name.endswith("weight") else 0.0
            p.copy_((base + 0.02 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return model


def _micro_batch(frames: int, size: int, patch: int, text: int, vocab: int, seed: int = 0):
    from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch
    from megatron_longvila.plan.frames import tokens_per_frame

    g = torch.Generator().manual_seed(seed)
    tpf = tokens_per_frame(size, size, patch)
    ids, pos = torch.randint(10, vocab, (5,), generator=g).tolist(), []
    for _ in range(frames):
        pos.append(list(range(len(ids), len(ids) + tpf)))
        ids += [MEDIA] * tpf + [7]
    prompt = len(ids)
    ids += torch.randint(10, vocab, (text,), generator=g).tolist()
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX
    media = [Media(token_positions=torch.tensor(pos), frames=torch.randn(frames, 3, size, size, generator=g))]
    text_only = torch.randint(10, vocab, (text // 2 + 3,), generator=g)
    return MicroBatch.from_samples([LongVILASample(input_ids=ids, labels=labels, media=media),
                                    LongVILASample(input_ids=text_only, labels=text_only.clone())])


def _planned(model, mb, device):
    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.modules import unwrap_model

    p = plan_microbatch(unwrap_model(model).visual_spec, mb, single_rank_mesh())
    p.step_scale = 1.0
    return p.to(device, model.vision_model.conv1.weight.dtype)


def _step(model, planned):
    """Forward, the step's loss function, backward: what Megatron's schedule runs for one micro-batch."""
    from megatron_longvila.training.step import LongVILAStep

    model.zero_grad(set_to_none=True)
    out = model(planned, reduction="none")
    loss, count, _ = LongVILAStep.loss_func(planned, out)
    loss.backward()
    return out[0].detach(), loss.detach()


def _grads(model):
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _max_rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _sync_free_step(model, planned, device):
    """Warm up, then one step with CUDA host syncs as errors around the model's calls."""
    _step(model, planned)
    if device != "cuda":
        t0 = time.perf_counter()
        _step(model, planned)
        return {"sync_debug": "not on CUDA", "step_s": time.perf_counter() - t0}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, planned)
        ok, err = True, None
    except RuntimeError as e:
        ok, err = False, str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"sync_free": ok, "sync_error": err, "step_s": time.perf_counter() - t0,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------

def section_a(device: str, tiny_only: bool) -> dict:
    out = {}
    model = _build(TINY_LLM, TINY_VISION, torch.bfloat16, device, _KERNEL[device])
    mb = _micro_batch(4, 56, 14, 200, TINY_LLM["vocab_size"])
    out["tiny"] = _sync_free_step(model, _planned(model, mb, device), device)
    out["tiny"]["params"] = sum(p.numel() for p in model.parameters())
    if not tiny_only:
        from megatron_longvila.models.registry import ENCODERS

        so400m = {k: getattr(ENCODERS["siglip_so400m_patch14_384"], k) for k in
                  ("image_size", "patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        big = _build(BIG_LLM, so400m, torch.bfloat16, device, "torch_cuda")
        planned = _planned(big, _micro_batch(8, 384, 14, 2000, BIG_LLM["vocab_size"]), device)
        out["1b"] = _sync_free_step(big, planned, device)
        out["1b"]["params"] = sum(p.numel() for p in big.parameters())
        out["1b"]["tokens"] = planned.batch.total_len
    return out


def _cpu_reference(path: str) -> None:
    """Section b's CPU half (run in a subprocess with CUDA hidden): per-token CE and gradients, fp32."""
    _init("cpu")
    model = _build(TINY_LLM, TINY_VISION, torch.float32, "cpu", "cpu")
    ce, _ = _step(model, _planned(model, _micro_batch(4, 56, 14, 200, TINY_LLM["vocab_size"]), "cpu"))
    torch.save({"ce": ce.cpu(), "grads": _grads(model)}, path)


def cpu_reference(script: str):
    """Run `script --cpu-reference PATH` with CUDA hidden; (its saved tensors, None) or (None, its stderr's tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cpu_ref.pt")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        r = subprocess.run([sys.executable, os.path.abspath(script), "--cpu-reference", path], env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode:
            return None, r.stderr[-2000:]
        return torch.load(path, weights_only=True), None


def section_b(device: str) -> dict:
    ref, error = cpu_reference(__file__)
    if error is not None:
        raise RuntimeError(f"the CPU reference subprocess failed: {error}")
    mb = _micro_batch(4, 56, 14, 200, TINY_LLM["vocab_size"])
    fp32 = _build(TINY_LLM, TINY_VISION, torch.float32, device, "math")
    ce32, _ = _step(fp32, _planned(fp32, mb, device))
    g32 = _grads(fp32)
    bf16 = _build(TINY_LLM, TINY_VISION, torch.bfloat16, device, _KERNEL[device])
    ce16, _ = _step(bf16, _planned(bf16, mb, device))
    g16 = _grads(bf16)
    fp32_vs_cpu = max([_max_rel(ce32.cpu(), ref["ce"])] + [_max_rel(g32[n], ref["grads"][n]) for n in ref["grads"]])
    bf16_vs_fp32 = max([_rel(ce16.float().cpu(), ce32.cpu())] + [_rel(g16[n], g32[n]) for n in g32])
    return {"fp32_vs_cpu_max_rel": fp32_vs_cpu, "fp32_ok": fp32_vs_cpu <= 1e-5, "bf16_vs_fp32_rel_l2": bf16_vs_fp32,
            "bf16_ok": bf16_vs_fp32 <= 2e-2, "grads_compared": len(ref["grads"])}


def section_c(device: str, seqs=(32768, 131072), rings=(2, 4, 8), iters: int = 10) -> list:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check

    return [gpu_check.bench_schedule(device, _KERNEL[device], T, R, 32, 8, 128, iters, rank)
            for T in seqs for R in rings for rank in (0, R - 1)]


_KERNEL = {"cuda": "torch_cuda", "cpu": "cpu"}
"""The flash kernel both sides of section d (and the ring in a and c) use, per device type."""


class _FlashCoreAttention(torch.nn.Module):
    """megatron-core core_attention over the same flash kernel MM-SP calls (TorchCUDABackend), one causal segment
    per batch row: the baseline for section d, where only MM-SP's plan, RoPE indexing and plumbing differ."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.scale = softmax_scale or config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron_longvila.plan.segments import Segments

        s, b, h, d = query.shape
        assert b == 1, "the baseline runs one sequence"
        out = _Flash.apply(query[:, 0], key[:, 0], value[:, 0], Segments([0, s], [0, s], True), self.scale)
        return out.reshape(s, 1, h * d)


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, scale):
        from megatron_longvila.attention.backends import get_backend

        be = get_backend(_KERNEL[q.device.type], q)
        o, l = be.forward(q, k, v, seg, scale)
        ctx.save_for_backward(q, k, v, o, l)
        ctx.seg, ctx.scale, ctx.be = seg, scale, be
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, l = ctx.saved_tensors
        dq, dk, dv = ctx.be.backward(do, q, k, v, o, l, ctx.seg, ctx.scale)
        return dq, dk, dv, None, None


def _time(fn, iters, device):
    """Median seconds of fn (CUDA events on a GPU, the wall clock elsewhere), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def section_d(device: str, seq: int = 8192, llm: dict = BIG_LLM, iters: int = 10) -> dict:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.models.registry import LLMShape, llm_transformer_config
    from megatron_longvila.models.specs import get_gpt_mmsp_layer_spec
    from megatron_longvila.batch.gpt import shard_batch

    shape = LLMShape(**{**llm, "num_layers": 4})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = llm_transformer_config(shape, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                 use_cpu_initialization=device != "cuda")
    from megatron_longvila.parallel.state import initialize_mmsp

    initialize_mmsp(cfg)
    mmsp = build_gpt_model(cfg, vocab_size=shape.vocab_size, max_sequence_length=seq, rotary_base=shape.rotary_base,
                           spec=get_gpt_mmsp_layer_spec("local")).to(device)
    base_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    base_spec.submodules.self_attention.submodules.core_attention = _FlashCoreAttention
    from megatron.core.models.gpt import GPTModel

    base = GPTModel(config=cfg, transformer_layer_spec=base_spec, vocab_size=shape.vocab_size,
                    max_sequence_length=seq, position_embedding_type="rope", rotary_base=shape.rotary_base).to(device)
    missing, unexpected = base.load_state_dict(mmsp.state_dict(), strict=False)
    tokens = torch.randint(0, shape.vocab_size, (1, seq))
    b = shard_batch(tokens, config=cfg)
    b.packed_seq_params.plan.to(device)
    args_m = (b.tokens.to(device), b.position_ids.to(device), None)
    labels = b.labels.to(device)
    tokens, pos = tokens.to(device), torch.arange(seq, device=device).unsqueeze(0)

    def run_mmsp():
        mmsp(*args_m, labels=labels, packed_seq_params=b.packed_seq_params).float().mean().backward()

    def run_base():
        base(tokens, pos, None, labels=labels).float().mean().backward()

    with torch.no_grad():  # the same model: same loss
        same = abs(float(mmsp(*args_m, labels=labels, packed_seq_params=b.packed_seq_params).float().mean())
                   - float(base(tokens, pos, None, labels=labels).float().mean()))
    t_m, t_b = _time(run_mmsp, iters, device), _time(run_base, iters, device)
    return {"seq": seq, "layers": shape.num_layers, "mmsp_s": t_m, "megatron_spec_s": t_b,
            "overhead": t_m / t_b - 1.0, "ok": t_m / t_b - 1.0 <= 0.02, "loss_abs_diff": same,
            "state_dict_mismatch": sorted(missing) + sorted(unexpected)}


def section_e(device: str, layer: str = "llama3_8b", seqs=(8192, 16384, 32768)) -> list:
    from megatron_longvila.models.registry import LLMS, llm_transformer_config
    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.models.specs import get_gpt_mmsp_layer_spec
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.batch.gpt import shard_batch
    from dataclasses import replace

    out = []
    shape = replace(LLMS[layer], num_layers=1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = llm_transformer_config(shape, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                 use_cpu_initialization=device != "cuda")
    initialize_mmsp(cfg)
    model = build_gpt_model(cfg, vocab_size=shape.vocab_size, max_sequence_length=max(seqs),
                            spec=get_gpt_mmsp_layer_spec("local"), pre_process=False, post_process=False).to(device)
    cuda = device == "cuda"
    for seq in seqs:
        x = torch.randn(seq, 1, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
        b = shard_batch(torch.zeros(1, seq, dtype=torch.long), config=cfg)
        b.packed_seq_params.plan.to(device)
        model.set_input_tensor(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        y = model(None, b.position_ids.to(device), None, packed_seq_params=b.packed_seq_params)
        fwd_peak = torch.cuda.max_memory_allocated() - before if cuda else None
        y.float().sum().backward()
        peak = torch.cuda.max_memory_allocated() - before if cuda else None
        out.append({"seq": seq, "forward_peak_bytes_per_token": fwd_peak / seq if cuda else None,
                    "peak_bytes_per_token": peak / seq if cuda else None})
        del x, y
        model.zero_grad(set_to_none=True)
    return out


def te_missing(dry_run: bool):
    """Why a Transformer Engine section cannot run here (None: it can)."""
    from megatron_longvila.runtime.probes import te_available

    if dry_run:
        return "needs Transformer Engine on CUDA (a dry run is on the CPU)"
    return None if te_available() else "Transformer Engine (transformer_engine.pytorch) does not import here"


def section_f(device: str) -> dict:
    """The tiny step with Transformer Engine's layers against the same weights in the local spec."""
    mb = _micro_batch(4, 56, 14, 200, TINY_LLM["vocab_size"])
    local = _build(TINY_LLM, TINY_VISION, torch.bfloat16, device, "torch_cuda")
    ce_local, _ = _step(local, _planned(local, mb, device))
    names_local = {canonical_name(n) for n, _ in local.named_parameters()}
    del local
    te = _build(TINY_LLM, TINY_VISION, torch.bfloat16, device, "te", use_te=True)
    names_te = {canonical_name(n) for n, _ in te.named_parameters()}
    if names_te != names_local:
        raise RuntimeError(f"the TE and local models differ in parameters: TE only "
                           f"{sorted(names_te - names_local)[:6]}, local only {sorted(names_local - names_te)[:6]}")
    planned = _planned(te, mb, device)
    out = _sync_free_step(te, planned, device)
    ce_te, _ = _step(te, planned)
    out.update(te_vs_local_rel_l2=_rel(ce_te.float(), ce_local.float()), finite=bool(torch.isfinite(ce_te).all()))
    return out


def section_g(device: str) -> dict:
    """FP8 attention under CP: 2x2 ranks sharing the GPU on the te_fp8 kernel."""
    import gpu_check

    return gpu_check.check_mmsp_mesh("te_fp8", 2, 2)


GOALS = {
    "a": Goal("no host synchronization inside the model's step",
              lambda r: (all(v.get("sync_free") for v in r.values() if isinstance(v, dict)),
                         "; ".join(f"{k}: sync-free {v.get('sync_free')} {v.get('sync_error') or ''}".strip()
                                   for k, v in r.items() if isinstance(v, dict)))),
    "b": Goal("GPU fp32 vs CPU <= 1e-5 (max relative), bf16 vs fp32 <= 2e-2 (relative L2)",
              lambda r: (r["fp32_ok"] and r["bf16_ok"],
                         f"fp32 vs CPU {r['fp32_vs_cpu_max_rel']:.2e}, bf16 vs fp32 {r['bf16_vs_fp32_rel_l2']:.2e}")),
    "c": Goal("ring schedule efficiency >= 0.95 (pairs/s against one fused causal call)",
              lambda r: (min(x["efficiency"] for x in r) >= 0.95,
                         "min " + f"{min(x['efficiency'] for x in r):.3f} over {len(r)} (T, R, rank)")),
    "d": Goal("MM-SP spec overhead <= 2% against Megatron's spec with the same kernel",
              lambda r: (r["overhead"] <= 0.02 and not r["state_dict_mismatch"],
                         f"overhead {100 * r['overhead']:.2f}%, loss difference {r['loss_abs_diff']:.2e}")),
    "f": Goal("TE step sync-free and finite, per-token losses within 2e-2 (relative L2) of the local spec",
              lambda r: (bool(r.get("sync_free", True)) and r["finite"] and r["te_vs_local_rel_l2"] <= 2e-2,
                         f"sync-free {r.get('sync_free')}, TE vs local {r['te_vs_local_rel_l2']:.2e}")),
    "g": Goal("FP8 attention on a 2x2 mesh within relative error 0.1 of float64 attention",
              lambda r: (max(r["rel_err"].values()) <= 0.1, f"relative error {max(r['rel_err'].values()):.3e} "
                                                                 f"(out and gradients)")),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,b")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and run every section at a tiny size on the CPU (checks this script anywhere; "
                        "its figures mean nothing)")
    p.add_argument("--cpu-reference", metavar="PATH", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cpu_reference:
        _cpu_reference(a.cpu_reference)
        return 0
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "planned_s": {s: SECTIONS[s] for s in only}}
    small = dict(BIG_LLM, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=500)
    sections = {
        "a": Section(lambda: section_a("cuda", False), lambda: section_a("cpu", tiny_only=True), GOALS["a"]),
        "b": Section(lambda: section_b("cuda"), lambda: section_b("cpu"), GOALS["b"]),
        "c": Section(lambda: section_c("cuda"), lambda: section_c("cpu", seqs=(256,), rings=(2,), iters=1),
                     GOALS["c"]),
        "d": Section(lambda: section_d("cuda"), lambda: section_d("cpu", seq=64, llm=small, iters=1), GOALS["d"]),
        "e": Section(lambda: section_e("cuda"), lambda: section_e("cpu", layer="tiny", seqs=(64,))),
        "f": Section(lambda: section_f("cuda"), goal=GOALS["f"], requires=te_missing),
        "g": Section(lambda: section_g("cuda"), goal=GOALS["g"], requires=te_missing),
    }
    status = run_sections("gpu_train_check", sections, only, a.dry_run, res, _init)
    if status != 2:
        emit(res, a.json)
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The memory model on a GPU, and the longest sequence one GPU trains (tools/gpu_session.sh's memory section).

Sections (each writes its part of one JSON object; `--only a,b` runs some of them):
  a  kernel figures: bf16 GEMM and flash-attention (forward + backward) TFLOP/s on this GPU, the "kernel_figures"
     tools/plan_mesh.py --kernel-figures reads in place of the stated ones
  b  an 8B-shape layer stack (Llama-3-8B layers, MM-SP spec, bf16, CP 1) for each recompute/offload setting:
     torch.cuda.max_memory_allocated over forward + backward against planning.memory's peak (GPU kernels: fused
     norms), and what offload saves on the device
  c  the longest sequence one GPU trains (forward + backward of the whole 8B LLM: bf16 weights, fp32 gradient
     buffers, optimizer state assumed sharded or offloaded) with full recompute and activation offload, doubling
     then bisecting, next to the memory model's prediction for the same settings

  python tools/gpu_memory_check.py --json            # on a CUDA machine (needs megatron-core)
  python tools/gpu_memory_check.py --dry-run --json  # anywhere: the same code at tiny sizes on the CPU, measured
                                                     # with planning.measure's tracker (figures mean nothing)

Never run on a GPU yet: written against the train section's harness (tools/gpu_train_check.py) and checked on the CPU
by --dry-run (CI runs it through tools/gpu_session.sh --dry-run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

SECTIONS = {"a": 20, "b": 70, "c": 120}
"""Planned seconds per section on an H200."""

GiB = 1024 ** 3


class _Meter:
    """Peak bytes above the start: CUDA's allocator statistics on a GPU, planning.measure's tracker on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.tracker = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            from megatron_longvila.planning.measure import LiveTensorTracker

            self.tracker = LiveTensorTracker()
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.tracker.__exit__(*exc)
            self.peak = self.tracker.peak
        return False


def _settings():
    from megatron_longvila.planning.mesh import settings_for

    return dict(settings_for(4))


def _stack(shape, layers: int, setting, device: str, dtype):
    """A bare stack of `layers` LLM layers (no embedding, no output) with the setting's recompute and offload."""
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.config import mmsp_config_from_megatron
    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.models.offload import offload_block
    from megatron_longvila.models.registry import llm_transformer_config
    from megatron_longvila.models.specs import get_gpt_mmsp_layer_spec

    cfg = llm_transformer_config(replace(shape, num_layers=layers), params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                 use_cpu_initialization=device != "cuda",
                                 **setting.llm.transformer_config_fields())
    mc = mmsp_config_from_megatron(cfg)
    mc.attention_backend = "torch_cuda" if device == "cuda" else "cpu"
    initialize_mmsp(cfg, mc)
    model = build_gpt_model(cfg, vocab_size=shape.vocab_size, max_sequence_length=shape.max_position_embeddings,
                            spec=get_gpt_mmsp_layer_spec("local"), pre_process=False, post_process=False).to(device)
    if setting.offload:
        offload_block(model.decoder, "llm")
    return model.train(), cfg


def _stack_step(model, cfg, seq: int, hidden: int, device: str, dtype) -> int:
    """Forward + backward of one sequence through the stack; the peak bytes above the input's."""
    from megatron_longvila.batch.gpt import shard_batch

    b = shard_batch(torch.zeros(1, seq, dtype=torch.long), config=cfg)
    b.packed_seq_params.plan.to(device)
    x = torch.randn(seq, 1, hidden, device=device, dtype=dtype, requires_grad=True)
    pos = b.position_ids.to(device)
    model.zero_grad(set_to_none=True)
    with _Meter(device) as m:
        model.set_input_tensor(x)
        y = model(None, pos, None, packed_seq_params=b.packed_seq_params)
        y.float().sum().backward()
    del x, y
    model.zero_grad(set_to_none=True)
    return m.peak


def _predicted_stack_peak(shape, layers: int, seq: int, setting, e: int, kernels) -> int:
    """planning.memory's peak for a middle pipeline stage holding exactly these layers (no embedding, no loss),
    less the input, which exists before the measurement starts."""
    from megatron_longvila.planning.memory import Layout, ModelShape, even_rank_work, predict_rank_memory

    ms = replace(ModelShape.from_configs(shape, _encoder()), layers=3 * layers)
    lay = Layout(pp=3)
    work = even_rank_work(ms, lay, seq, 0)
    pred = predict_rank_memory(ms, lay, work, setting, micro_batches=1, stage=1, element_bytes=e, kernels=kernels)
    return pred.peak_bytes - seq * ms.hidden * e


def _encoder():
    from megatron_longvila.models.registry import ENCODERS

    return ENCODERS["siglip_tiny"]


def section_a(device: str, n: int = 8192, seq: int = 8192, iters: int = 10) -> dict:
    from gpu_train_check import _time

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, iters, device)
    gemm = 2 * n ** 3 / t / 1e12
    q, k, v = (torch.randn(1, 32, seq, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def attn():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    ta = _time(attn, iters, device)
    flops = 3.5 * 2 * seq * seq * 32 * 128  # causal forward 2 T^2 H d (half of 4), backward 2.5 x
    return {"kernel_figures": {"gemm_tflops": gemm, "attention_tflops": flops / ta / 1e12,
                               "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
            "gemm_n": n, "attention_seq": seq}


def section_b(device: str, layer: str = "llama3_8b", layers: int = 4, seq: int = 16384) -> list:
    from megatron_longvila.models.registry import LLMS
    from megatron_longvila.planning.memory import CPU_KERNELS, GPU_KERNELS

    shape = replace(LLMS[layer], max_position_embeddings=max(seq, LLMS[layer].max_position_embeddings))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    e = 2 if dtype == torch.bfloat16 else 4
    kernels = GPU_KERNELS if device == "cuda" else CPU_KERNELS
    out = []
    for name, setting in _settings().items():
        model, cfg = _stack(shape, layers, setting, device, dtype)
        _stack_step(model, cfg, min(seq, 256), shape.hidden_size, device, dtype)  # warm-up (allocator, caches)
        peak = _stack_step(model, cfg, seq, shape.hidden_size, device, dtype)
        pred = _predicted_stack_peak(shape, layers, seq, setting, e, kernels)
        out.append({"setting": name, "seq": seq, "layers": layers, "measured_bytes": peak, "predicted_bytes": pred,
                    "relative_error": (pred - peak) / peak if peak else None})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    base = next(r for r in out if r["setting"] == "none")["measured_bytes"]
    for r in out:
        r["saved_vs_none"] = 1 - r["measured_bytes"] / base if base else None
    return out


def _full_model_fits(shape, seq: int, setting, device: str, dtype, budget_bytes=None) -> bool:
    """One forward + backward of the whole LLM (embedding and loss included) at `seq` tokens; False on OOM (or,
    in a dry run, when the tracked peak exceeds `budget_bytes`)."""
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.config import mmsp_config_from_megatron
    from megatron_longvila.models.gpt import build_gpt_model
    from megatron_longvila.models.offload import offload_block
    from megatron_longvila.models.registry import llm_transformer_config
    from megatron_longvila.models.specs import get_gpt_mmsp_layer_spec
    from megatron_longvila.batch.gpt import shard_batch

    model = None
    try:
        sh = replace(shape, max_position_embeddings=max(seq, shape.max_position_embeddings))
        cfg = llm_transformer_config(sh, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                     use_cpu_initialization=device != "cuda",
                                     **setting.llm.transformer_config_fields())
        mc = mmsp_config_from_megatron(cfg)
        mc.attention_backend = "torch_cuda" if device == "cuda" else "cpu"
        initialize_mmsp(cfg, mc)
        model = build_gpt_model(cfg, vocab_size=sh.vocab_size, max_sequence_length=sh.max_position_embeddings,
                                spec=get_gpt_mmsp_layer_spec("local")).to(device).train()
        def into_main_grad(q):
            q.main_grad.add_(q.grad)
            q.grad = None

        for p in model.parameters():  # Megatron's fp32 gradient buffers (optimizer state lives elsewhere)
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=device)
            p.register_post_accumulate_grad_hook(into_main_grad)
        if setting.offload:
            offload_block(model.decoder, "llm")
        tokens = torch.randint(0, sh.vocab_size, (1, seq))
        b = shard_batch(tokens, config=cfg)
        b.packed_seq_params.plan.to(device)
        with _Meter(device) as m:
            loss = model(b.tokens.to(device), b.position_ids.to(device), None, labels=b.labels.to(device),
                         packed_seq_params=b.packed_seq_params)
            loss.float().sum().backward()
        return budget_bytes is None or m.peak <= budget_bytes
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def section_c(device: str, layer: str = "llama3_8b", start: int = 16384, step: int = 8192, max_seq: int = 1 << 21,
              budget_bytes=None, deadline_s: float = 100.0) -> dict:
    from megatron_longvila.models.registry import ENCODERS, LLMS
    from megatron_longvila.planning.memory import GPU_KERNELS, Layout, ModelShape, Workload, rank_memory_gb

    shape = LLMS[layer]
    setting = _settings()["full+offload"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    lo, hi, seq = 0, None, start
    while seq <= max_seq and time.perf_counter() - t0 < deadline_s:  # double until it fails
        if _full_model_fits(shape, seq, setting, device, dtype, budget_bytes):
            lo, seq = seq, seq * 2
        else:
            hi = seq
            break
    while hi is not None and hi - lo > step and time.perf_counter() - t0 < deadline_s:  # then bisect
        mid = (lo + hi) // 2 // step * step
        if _full_model_fits(shape, mid, setting, device, dtype, budget_bytes):
            lo = mid
        else:
            hi = mid
    capacity = (torch.cuda.get_device_properties(0).total_memory / GiB if device == "cuda"
                else (budget_bytes or 0) / GiB)
    ms = ModelShape.from_configs(shape, ENCODERS["siglip_so400m_patch14_384"])
    predicted, s = 0, start
    while s <= max_seq:  # the memory model's longest, same settings (weights, gradients, no optimizer state)
        m = rank_memory_gb(ms, Layout(), Workload(seq_length=s), setting, kernels=GPU_KERNELS, workspace_gb=0.0)
        if m["total"] - m["optimizer"] > capacity:
            break
        predicted, s = s, s + step
    return {"layer": layer, "setting": "full recompute + offload", "longest_seq": lo, "first_failing_seq": hi,
            "predicted_longest_seq": predicted, "capacity_gb": capacity, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,b")
    p.add_argument("--dry-run", action="store_true",
                   help="run every section at a tiny size on the CPU (checks this script anywhere; figures mean "
                        "nothing)")
    a = p.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    from gpu_sections import Section, emit, run_sections
    from gpu_train_check import _init

    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "planned_s": {s: SECTIONS[s] for s in only}}
    sections = {
        "a": Section(lambda: section_a("cuda"), lambda: section_a("cpu", n=128, seq=128, iters=1)),
        "b": Section(lambda: section_b("cuda"), lambda: section_b("cpu", layer="tiny", layers=2, seq=128)),
        "c": Section(lambda: section_c("cuda"),
                     lambda: section_c("cpu", layer="tiny", start=64, step=64, max_seq=512, budget_bytes=4 * 2 ** 20,
                                       deadline_s=30)),
    }
    status = run_sections("gpu_memory_check", sections, only, a.dry_run, res, _init)
    if status == 2:
        return status
    if isinstance(res.get("a"), dict) and "kernel_figures" in res["a"]:
        res["kernel_figures"] = res["a"]["kernel_figures"]  # what plan_mesh.py --kernel-figures reads
    emit(res, a.json)
    return status

if __name__ == "__main__":
    sys.exit(main())

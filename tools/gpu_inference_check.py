#!/usr/bin/env python3
"""MM-SP inference on one GPU: bf16 generation checked against CPU fp32, and prefill / decode figures.

1. The tiny LongVILA of tools/gpu_train_check.py (head dims multiples of 8) generates greedily in bf16 on the GPU
   with the `torch_cuda` kernel; the same model in fp32 on the CPU (a subprocess with CUDA hidden) is the reference.
   Rule: every token equals the reference's, except at a step whose reference top-2 logits are within the bf16
   tolerance (0.05 here), where generation may diverge and the check ends.
2. Figures at about 1B parameters (SigLIP so400m + a 0.8B LLM): prefill seconds for a video prompt of 8 frames + 2000
   text tokens, decode tokens/s, KV bytes, peak memory.

  python tools/gpu_inference_check.py --json       # CUDA machine (megatron-core installed)
  python tools/gpu_inference_check.py --dry-run    # anywhere: the same code at tiny size on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import gpu_train_check as g  # noqa: E402

BF16_TIE = 0.05
STEPS = 16


def _generate(device, dtype, kernel, trace_logits: bool):
    from megatron_longvila.inference import prefill
    from megatron_longvila.inference.generate import _decode
    from megatron_longvila.parallel.mesh import single_rank_mesh

    model = g._build(g.TINY_LLM, g.TINY_VISION, dtype, device, kernel)
    model.eval()
    mb_prompt = _prompt()
    pre = prefill(model, mb_prompt, single_rank_mesh(), reserve=STEPS)
    trace = []
    tokens = _decode(model, pre, single_rank_mesh(), max_new_tokens=STEPS, temperature=0.0, top_k=0, top_p=1.0,
                     eos_id=None, generator=None, trace=trace)
    logits = [pre.logits.float().cpu()] + [t.float() for t in trace]
    return tokens, logits


def _prompt():
    from megatron_longvila.models.longvila import LongVILASample

    mb = g._micro_batch(4, 56, 14, 60, g.TINY_LLM["vocab_size"])
    n = mb.seq_lens[0]
    s = LongVILASample(input_ids=mb.input_ids[:n], labels=mb.labels[:n], media=[])
    # Re-attach the video of the first sample (MicroBatch keeps its frames flattened).
    from megatron_longvila.models.longvila import Media

    pos = torch.stack([f.positions for f in mb.frames])
    s.media = [Media(token_positions=pos, frames=torch.stack([f.pixels for f in mb.frames]))]
    return s


def _cpu_reference(path):
    g._init("cpu")
    tokens, logits = _generate("cpu", torch.float32, "cpu", True)
    torch.save({"tokens": tokens, "logits": logits}, path)


def check_bf16_vs_cpu(device):
    ref, error = g.cpu_reference(__file__)
    if error is not None:
        raise RuntimeError(f"the CPU reference subprocess failed: {error}")
    kernel = g._KERNEL[device]
    tokens, logits = _generate(device, torch.bfloat16 if device == "cuda" else torch.float32, kernel, True)
    verdict, compared = "equal", 0
    for s, (a, b) in enumerate(zip(tokens, ref["tokens"])):
        top2 = torch.topk(ref["logits"][s], 2).values
        if a != b:
            verdict = "near tie" if float(top2[0] - top2[1]) < BF16_TIE else f"differs at step {s}"
            break
        compared += 1
    return {"verdict": verdict, "steps_compared": compared, "ok": verdict in ("equal", "near tie"),
            "tokens": tokens, "reference": ref["tokens"]}


def figures(device, big: bool):
    from megatron_longvila.inference import generate
    from megatron_longvila.models.registry import ENCODERS
    from megatron_longvila.parallel.mesh import single_rank_mesh

    if big:
        so400m = {k: getattr(ENCODERS["siglip_so400m_patch14_384"], k) for k in
                  ("image_size", "patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")}
        model = g._build(g.BIG_LLM, so400m, torch.bfloat16, device, g._KERNEL[device])
        mb = g._micro_batch(8, 384, 14, 2000, g.BIG_LLM["vocab_size"])
    else:
        model = g._build(g.TINY_LLM, g.TINY_VISION, torch.float32, device, g._KERNEL[device])
        mb = g._micro_batch(4, 56, 14, 60, g.TINY_LLM["vocab_size"])
    model.eval()
    from megatron_longvila.models.longvila import LongVILASample, Media

    n = mb.seq_lens[0]
    prompt = LongVILASample(input_ids=mb.input_ids[:n], labels=mb.labels[:n],
                            media=[Media(token_positions=torch.stack([f.positions for f in mb.frames]),
                                         frames=torch.stack([f.pixels for f in mb.frames]))])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = []
    generate(model, [prompt], single_rank_mesh(), max_new_tokens=64, stats=stats)  # warm-up included in the first
    stats = []
    generate(model, [prompt], single_rank_mesh(), max_new_tokens=64, stats=stats)
    st = stats[0]
    return {"prompt_tokens": st["prompt_tokens"], "prefill_s": st["prefill_s"],
            "decode_tokens_per_s": (st["new_tokens"] - 1) / st["decode_s"], "kv_bytes": st["kv_bytes"],
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="the same code at tiny size on the CPU")
    p.add_argument("--cpu-reference", metavar="PATH", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cpu_reference:
        _cpu_reference(a.cpu_reference)
        return 0
    from gpu_sections import Goal, Section, emit, run_sections

    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    sections = {
        "bf16_vs_cpu": Section(lambda: check_bf16_vs_cpu("cuda"), lambda: check_bf16_vs_cpu("cpu"),
                               Goal("greedy bf16 tokens equal CPU fp32's up to a near tie of the top-2 logits",
                                    lambda r: (r["ok"], f"{r['verdict']} over {r['steps_compared']} steps"))),
        "figures": Section(lambda: figures("cuda", True), lambda: figures("cpu", big=False)),
    }
    status = run_sections("gpu_inference_check", sections, list(sections), a.dry_run, res, g._init)
    if status != 2:
        emit(res, a.json)
    return status

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Plan LongVILA's mesh for a cluster: every TP x Ulysses x ring x PP x DP layout of the GPUs, with the activation
recompute/offload setting that fits, ranked by predicted step time; and why the others cannot run.

    python tools/plan_mesh.py --model qwen2_7b --seq-length 1048576 --gpus 256 --gpus-per-domain 8 \\
        --gpu-memory-gb 80 --gpu h100
    python tools/plan_mesh.py --model ckpt/long_sft/iter_0001000 --seq-length 262144 --gpus 72 \\
        --gpus-per-domain 72 --gpu-memory-gb 186 --gpu gb200 --json
    python tools/plan_mesh.py --paper            # the cost model on LongVILA's baselines (docs/SCALING.md)

--model is an LLM name of the registry (with --vision-encoder, default SigLIP so400m) or a checkpoint's iteration
folder holding model_record.json. The memory model is megatron_longvila.planning.memory (validated on CPU by
tools/bench_memory.py), the time model planning.timing (stated H100/H200/GB200 figures unless --kernel-figures names
a tools/gpu_memory_check.py result). --json prints {"plans": [...best first], "infeasible": [{layout, reason}], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_shape(model: str, encoder: str):
    """A registry LLM name, or a checkpoint folder (an iteration folder or a --save root) with its model record."""
    from megatron_longvila.models.registry import ENCODERS, LLMS
    from megatron_longvila.planning.memory import ModelShape

    if model in LLMS:
        if encoder not in ENCODERS:
            raise SystemExit(f"--vision-encoder {encoder}: one of {sorted(ENCODERS)}")
        return ModelShape.from_configs(LLMS[model], ENCODERS[encoder]), f"{model} + {encoder}"
    if os.path.isdir(model):
        from megatron_longvila.models.record import read_model_record

        path = model
        record = read_model_record(path)
        if record is None:
            from megatron_longvila.checkpoint.layout import checkpoint_dir, read_tracker

            it = read_tracker(path)
            if it is not None:
                path = checkpoint_dir(path, it)
                record = read_model_record(path)
        if record is None:
            raise SystemExit(f"--model {model}: no model_record.json there (give an iter_N folder of a LongVILA "
                             f"checkpoint, or one of {sorted(LLMS)})")
        return ModelShape.from_configs(record.llm_shape(), record.vision_config()), f"checkpoint {path}"
    raise SystemExit(f"--model {model}: neither an LLM of the registry ({', '.join(sorted(LLMS))}) nor a checkpoint "
                     f"folder")


def main(argv=None) -> int:
    from megatron_longvila.planning.timing import PROFILES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="LLM name (models.registry.LLMS) or a checkpoint folder")
    p.add_argument("--vision-encoder", default="siglip_so400m_patch14_384")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (one packed micro-batch)")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames per sequence (default: video fills 90%% of the sequence)")
    p.add_argument("--frame-px", type=int, default=None, help="frame size (default: the encoder's)")
    p.add_argument("--gpus", type=int)
    p.add_argument("--gpus-per-domain", type=int, help="GPUs per NVLink domain (8: HGX node; 72: NVL72)")
    p.add_argument("--gpu-memory-gb", type=float, help="usable memory per GPU")
    p.add_argument("--gpu", choices=sorted(PROFILES), default=None,
                   help="throughput profile (default: gb200 for 72-GPU domains, else h100)")
    p.add_argument("--nvlink-gbps", type=float, default=None, help="per-GPU NVLink GB/s one way (profile's default)")
    p.add_argument("--network-gbps", type=float, default=None, help="per-GPU network GB/s one way")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default GPUs / 8)")
    p.add_argument("--kernel-figures", default=None, help="measured GEMM/attention TFLOP/s (gpu_memory_check --json)")
    p.add_argument("--top", type=int, default=10, help="plans to print (--json: all)")
    p.add_argument("--paper", action="store_true", help="print the comparison with LongVILA's baselines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    from megatron_longvila.plan.frames import tokens_per_frame
    from megatron_longvila.planning.mesh import PAPER, Cluster, paper_comparison, plan_mesh
    from megatron_longvila.planning.timing import load_kernel_figures

    if a.paper:
        shape, desc = load_shape(a.model or "llama3_8b", a.vision_encoder)
        rows = paper_comparison(shape)
        if a.json:
            print(json.dumps({"model": desc, "paper": PAPER, "rows": rows}))
        else:
            print(f"{desc}, H100, 8 GPUs per node, full recompute; seconds per sequence without the gradient "
                  f"all-reduce (ratios: baseline / MM-SP)")
            print(f"{'GPUs':>5s} {'tokens':>9s} {'MM-SP':>9s} {'ring':>9s} {'TP+CP':>9s} {'ring/MM-SP':>11s} "
                  f"{'TP+CP/MM-SP':>12s}")
            for r in rows:
                def cell(k):
                    v = r.get(k)
                    return f"{v['without_grad_reduce_s']:9.2f}{'' if v['fits'] else '*'}" if v else f"{'-':>9s}"

                print(f"{r['gpus']:5d} {r['seq_length']:9d} {cell('mmsp')} {cell('ring')} {cell('megatron_tp_cp')} "
                      f"{r.get('ring_over_mmsp', 0):11.2f} {r.get('megatron_over_mmsp', 0):12.2f}")
            print("* does not fit in 80 GB at that setting")
        return 0

    missing = [f for f in ("model", "seq_length", "gpus", "gpus_per_domain", "gpu_memory_gb") if getattr(a, f) is None]
    if missing:
        p.error("required: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    shape, desc = load_shape(a.model, a.vision_encoder)
    gpu = a.gpu or ("gb200" if a.gpus_per_domain >= 72 else "h100")
    profile = PROFILES[gpu]
    if a.nvlink_gbps:
        profile = replace(profile, nvlink_gbps=a.nvlink_gbps)
    if a.network_gbps:
        profile = replace(profile, network_gbps=a.network_gbps)
    if a.kernel_figures:
        profile = load_kernel_figures(a.kernel_figures, profile)
    px = a.frame_px or shape.image
    tpf = tokens_per_frame(px, px, shape.patch)
    frames = a.frames if a.frames is not None else int(0.9 * a.seq_length / (tpf + 1))
    cluster = Cluster(gpus=a.gpus, gpus_per_domain=a.gpus_per_domain, gpu_memory_gb=a.gpu_memory_gb, profile=profile)
    plans, infeasible = plan_mesh(shape, cluster, a.seq_length, frames, a.global_batch_size, frame_px=a.frame_px)
    out = {"model": desc, "seq_length": a.seq_length, "frames": frames, "gpus": a.gpus,
           "gpus_per_domain": a.gpus_per_domain, "gpu_memory_gb": a.gpu_memory_gb, "profile": asdict(profile),
           "global_batch_size": a.global_batch_size or max(1, a.gpus // 8),
           "plans": [pl.as_dict() for pl in plans], "infeasible": infeasible}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{desc}: {a.seq_length:,} tokens ({frames} frames) per sequence, {out['global_batch_size']} sequences per "
          f"step, {a.gpus} x {gpu} ({a.gpus_per_domain} per NVLink domain, {a.gpu_memory_gb:g} GiB)")
    if not plans:
        print("no layout fits")
    for i, pl in enumerate(plans[:a.top]):
        print(f"{i + 1:2d}. TP {pl.tp} U {pl.ulysses} R {pl.ring} PP {pl.pp} DP {pl.dp}  {pl.setting:14s} "
              f"{pl.memory_gb:6.1f} GiB  {pl.step_time_s:8.2f} s/step  {pl.tokens_per_s_per_gpu:8.0f} tok/s/GPU")
        if i == 0:
            print("    " + " ".join(pl.flags))
    reasons = {}
    for x in infeasible:
        reasons.setdefault(x["kind"], []).append(x)
    print(f"{len(infeasible)} layouts cannot run: " + ", ".join(f"{k} ({len(v)})" for k, v in reasons.items()))
    for k, v in reasons.items():
        lay = v[0]["layout"]
        print(f"  e.g. TP {lay['tp']} U {lay['ulysses']} R {lay['ring']} PP {lay['pp']} DP {lay['dp']}: {v[0]['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

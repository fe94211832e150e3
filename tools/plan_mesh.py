#!/usr/bin/env python3
"""Plan LongVILA's mesh for a cluster: every TP x Ulysses x ring x PP x DP layout of the GPUs, with the activation
recompute/offload setting that fits, ranked by predicted step time; and why the others cannot run.

    python tools/plan_mesh.py --model qwen2_7b --seq-length 1048576 --gpus 256 --gpu h100
    python tools/plan_mesh.py --model qwen2_7b --recipe long_sft --gpus 256 --gpu h100 --train-iters 1000 \\
        --emit-args examples/configs/qwen2_7b_long_sft.args --index examples/configs/index.json
    python tools/plan_mesh.py --model ckpt/long_sft/iter_0001000 --seq-length 262144 --gpus 72 \\
        --gpus-per-domain 72 --gpu-memory-gb 186 --gpu gb200 --json
    python tools/plan_mesh.py --paper            # the cost model on LongVILA's baselines (docs/SCALING.md)

--model is an LLM name of the registry (with --vision-encoder, default SigLIP so400m) or a checkpoint's iteration
folder holding model_record.json. The memory model is megatron_longvila.planning.memory (validated on CPU by
tools/bench_memory.py), the time model planning.timing (stated H100/H200/GB200 figures unless --kernel-figures names
a tools/gpu_memory_check.py result). --gpu h100|h200|gb200 implies the GPU's memory and NVLink domain
(--gpu-memory-gb and --gpus-per-domain still override). --recipe takes a LongVILA stage's sequence length, global
batch and media as defaults. Every run prints the launch command of the best plan; --emit-args FILE writes that
plan as a flag file for examples/pretrain_longvila.py (no cluster paths: data, tokenizer and checkpoints come on the
command line), and --index records it in examples/configs/index.json with the command that made it and the dry run
that checks it. --json prints one object on the last line: {"plans": [...best first], "infeasible": [{layout,
reason}], "command": the launch command, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    p.add_argument("--gpu-memory-gb", type=float,
                   help="memory per GPU (GiB visible to CUDA); plans keep 5%% of it free (planning.memory)")
    p.add_argument("--gpu", choices=sorted(PROFILES), default=None,
                   help="throughput profile (default: gb200 for 72-GPU domains, else h100)")
    p.add_argument("--nvlink-gbps", type=float, default=None, help="per-GPU NVLink GB/s one way (profile's default)")
    p.add_argument("--network-gbps", type=float, default=None, help="per-GPU network GB/s one way")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default GPUs / 8)")
    p.add_argument("--kernel-figures", default=None, help="measured GEMM/attention TFLOP/s (gpu_memory_check --json)")
    p.add_argument("--top", type=int, default=10, help="plans to print (--json: all)")
    p.add_argument("--paper", action="store_true", help="print the comparison with LongVILA's baselines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--recipe", default=None, help="a LongVILA stage (align, pretrain, short_sft, context_extension, "
                   "long_sft): its --seq-length, --global-batch-size and media are the defaults; needed by --emit-args")
    p.add_argument("--emit-args", metavar="FILE", default=None,
                   help="write the best plan as a flag file for examples/pretrain_longvila.py (with --recipe and "
                        "--train-iters)")
    p.add_argument("--train-iters", type=int, default=None, help="the schedule length an emitted file carries")
    p.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                   help="the layers an emitted file asks for (default: Transformer Engine's)")
    p.add_argument("--index", metavar="JSON", default=None,
                   help="with --emit-args: record the file in this index (examples/configs/index.json)")
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)

    from megatron_longvila.plan.frames import tokens_per_frame
    from megatron_longvila.planning.memory import planned_frames
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

    recipe = None
    if a.recipe is not None:
        from megatron_longvila.training.recipes import RECIPES

        if a.recipe not in RECIPES:
            p.error(f"--recipe {a.recipe}: one of {list(RECIPES)}")
        recipe = RECIPES[a.recipe]
        a.seq_length = a.seq_length or recipe.seq_length
        a.global_batch_size = a.global_batch_size or recipe.global_batch_size
    if a.gpu is not None:  # the GPU's own memory and NVLink domain, unless given
        a.gpu_memory_gb = a.gpu_memory_gb or PROFILES[a.gpu].memory_gb
        a.gpus_per_domain = a.gpus_per_domain or PROFILES[a.gpu].domain
    missing = [f for f in ("model", "seq_length", "gpus", "gpus_per_domain", "gpu_memory_gb") if getattr(a, f) is None]
    if missing:
        p.error("required: " + ", ".join("--" + m.replace("_", "-") for m in missing)
                + ("" if a.gpu else " (--gpu h100|h200|gb200 implies the last two)"))
    if a.emit_args and (recipe is None or a.train_iters is None or a.model not in _registry_llms()):
        p.error("--emit-args needs --recipe, --train-iters and a registry --model (the file names the model)")
    if a.index and not a.emit_args:
        p.error("--index records an emitted file: give --emit-args FILE")
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
    frames = a.frames if a.frames is not None else planned_frames(a.seq_length, tpf, recipe is None or recipe.media)
    cluster = Cluster(gpus=a.gpus, gpus_per_domain=a.gpus_per_domain, gpu_memory_gb=a.gpu_memory_gb, profile=profile)
    plans, infeasible = plan_mesh(shape, cluster, a.seq_length, frames, a.global_batch_size, frame_px=a.frame_px)
    out = {"model": desc, "seq_length": a.seq_length, "frames": frames, "gpus": a.gpus,
           "gpus_per_domain": a.gpus_per_domain, "gpu_memory_gb": a.gpu_memory_gb, "profile": asdict(profile),
           "global_batch_size": a.global_batch_size or max(1, a.gpus // 8),
           "plans": [pl.as_dict() for pl in plans], "infeasible": infeasible}
    if plans:
        flags = _script_flags(a, plans[0])
        gpn = min(a.gpus, a.gpus_per_domain)
        if a.emit_args:
            _emit(a, flags, gpn, gpu, argv)
        out["command"] = launch_command(a.emit_args, flags, a.gpus, gpn, recipe)
    else:
        out["command"] = None
    if a.json:
        print(json.dumps(out))
        return 0 if plans or not a.emit_args else 1
    print(f"{desc}: {a.seq_length:,} tokens ({frames} frames) per sequence, {out['global_batch_size']} sequences per "
          f"step, {a.gpus} x {gpu} ({a.gpus_per_domain} per NVLink domain, {a.gpu_memory_gb:g} GiB)")
    if not plans:
        print("no layout fits")
        if a.emit_args:
            print(f"--emit-args {a.emit_args}: nothing written", file=sys.stderr)
            return 1
    for i, pl in enumerate(plans[:a.top]):
        print(f"{i + 1:2d}. TP {pl.tp} U {pl.ulysses} R {pl.ring} PP {pl.pp} DP {pl.dp}  {pl.setting:14s} "
              f"{pl.memory_gb:6.1f} GiB  {pl.step_time_s:8.2f} s/step  {pl.tokens_per_s_per_gpu:8.0f} tok/s/GPU")
        if i == 0:
            print("    " + " ".join(pl.flags))
    reasons = {}
    for x in infeasible:
        reasons.setdefault(x["kind"], []).append(x)
    if plans:
        if a.emit_args:
            print(f"wrote {a.emit_args}" + (f" (recorded in {a.index})" if a.index else ""))
        print("launch:\n    " + out["command"])
    print(f"{len(infeasible)} layouts cannot run: " + ", ".join(f"{k} ({len(v)})" for k, v in reasons.items()))
    for k, v in reasons.items():
        lay = v[0]["layout"]
        print(f"  e.g. TP {lay['tp']} U {lay['ulysses']} R {lay['ring']} PP {lay['pp']} DP {lay['dp']}: {v[0]['reason']}")
    return 0


def _registry_llms():
    from megatron_longvila.models.registry import LLMS

    return LLMS


def _script_flags(a, plan) -> list:
    """examples/pretrain_longvila.py's flags for a plan: the model, the stage, the mesh and memory setting."""
    f = (["--recipe", a.recipe] if a.recipe else []) + ["--llm", a.model, "--vision-encoder", a.vision_encoder]
    f += plan.flags + ["--transformer-impl", a.transformer_impl]
    if a.train_iters is not None:
        f += ["--train-iters", str(a.train_iters)]
    return f


def launch_command(flag_file, flags, gpus: int, gpus_per_node: int, recipe) -> str:
    """The whole launch: examples/slurm/train_single_node.sh (torchrun) on one node, examples/slurm/
    train_longvila.sbatch (one torchrun per node) on several; the flags after the file override the scripts' mesh
    defaults; the paths a cluster supplies are left as DATA, TOKENIZER and CKPT."""
    args = ["@" + flag_file] if flag_file else list(flags)
    args += ["--data-path", "DATA", "--tokenizer-model", "TOKENIZER", "--save", f"CKPT/{recipe.name if recipe else 'run'}",
             "--load", f"CKPT/{recipe.name if recipe else 'run'}"]
    if recipe is not None and recipe.previous:
        args += ["--pretrained-checkpoint", f"CKPT/{recipe.previous}"]
    if gpus <= gpus_per_node:  # one node: torchrun with the environment Megatron wants on Hopper
        head = [f"GPUS={gpus}", "bash", "examples/slurm/train_single_node.sh"]
    else:
        if gpus % gpus_per_node:
            raise SystemExit(f"--gpus {gpus} is not a whole number of {gpus_per_node}-GPU nodes")
        head = ["sbatch", "--nodes", str(gpus // gpus_per_node), "--gpus-per-node", str(gpus_per_node),
                "examples/slurm/train_longvila.sbatch"]
    return shlex.join(head + args)


def _emit(a, flags, gpus_per_node: int, gpu: str, argv) -> None:
    """Write the flag file (one argument per line, as argparse reads @files) and record it in the index."""
    with open(a.emit_args, "w") as f:
        f.write("\n".join(flags) + "\n")
    if not a.index:
        return
    entries = json.load(open(a.index)) if os.path.exists(a.index) else []
    entry = {"file": a.emit_args, "gpus": a.gpus, "gpus_per_node": gpus_per_node, "gpu": gpu,
             "planner": shlex.join(["python", "tools/plan_mesh.py"] + list(argv)),
             "dry_run": ["@" + a.emit_args, "--data-path", "DATA", "--dry-run", "--world-size", str(a.gpus),
                         "--gpus-per-node", str(gpus_per_node), "--gpu", gpu]}
    entries = [e for e in entries if e["file"] != a.emit_args] + [entry]
    with open(a.index, "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())

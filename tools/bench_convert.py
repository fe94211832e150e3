"""Time and peak memory of checkpoint conversion: a random Qwen2-1.5B-shaped LongVILA checkpoint (bf16; SigLIP
so400m-384 with its pooling head, the 2x2 projector, Qwen2-1.5B with tied embeddings, vocabulary 151648, as
qwen2-1.5b-longvila-256f) in the Hugging Face VILA layout, converted HF -> MCore and back, each conversion in a
fresh process (its peak resident memory: VmHWM). Also checks the way back is byte-identical, and measures a
sliced load: the HF folder loaded by `load_longvila` at TP 2 x PP 2 on 4 local gloo ranks, each rank's safetensors
bytes as its reader counted them (headers, tensor data) against the whole checkpoint (what every rank read before
sliced reads). Not run in CI (about 4 GB written three times).

    python tools/bench_convert.py --json [--workdir DIR] [--keep] [--shape qwen2_1.5b|tiny] [--load-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone

SHAPES = {
    # (LLM: hidden, layers, heads, kv heads, ffn, vocab, tied), (vision: image, patch, hidden, layers, heads, ffn)
    "qwen2_1.5b": ((1536, 28, 12, 2, 8960, 151648, True), (384, 14, 1152, 27, 16, 4304)),
    "tiny": ((64, 2, 4, 2, 96, 300, True), (56, 14, 32, 2, 4, 48)),
}


def _record(shape: str):
    from megatron_longvila.conversion.mappings import padded_vocab_size
    from megatron_longvila.models.record import record_of
    from megatron_longvila.models.registry import LLMShape
    from megatron_longvila.models.vision import VisionConfig

    (h, layers, heads, kv, ffn, vocab, tied), (img, patch, c, lv, vh, vf) = SHAPES[shape]
    llm = LLMShape(hidden_size=h, num_layers=layers, num_attention_heads=heads, num_query_groups=kv,
                   ffn_hidden_size=ffn, vocab_size=padded_vocab_size(vocab + 3), rotary_base=15300000,
                   norm_epsilon=1e-6, qkv_bias=True, tie_embeddings=tied, max_position_embeddings=65536)
    vis = VisionConfig(image_size=img, patch_size=patch, hidden_size=c, num_layers=lv, num_attention_heads=vh,
                       ffn_hidden_size=vf, select_layer=-2, apply_post_layernorm=False, head=True)
    return record_of(llm, vis, real_vocab_size=vocab, hf={"vision_key_prefix": "vision_model.", "dtype": "bfloat16"},
                     tokenizer={"vocab_size": vocab + 3, "media_token_id": vocab + 1})


def write_random(path: str, shape: str) -> None:
    """A random checkpoint of `shape` in the HF VILA layout (bf16), written by the project's HF writer."""
    import torch

    from megatron_longvila.conversion.hf_common import write_hf_vila
    from megatron_longvila.conversion.source import VOCAB_KEYS, Source

    class Random(Source):
        format = "random"

        def __init__(self):
            self.record = _record(shape)
            self.path = "random"
            self.g = torch.Generator().manual_seed(0)

        def canonical(self, key):
            spec = next(s for s in self.specs() if s.key == key)
            t = (torch.randn(spec.shape, generator=self.g) * 0.02).to(torch.bfloat16)
            if key in VOCAB_KEYS:  # rows past the stored vocabulary are padding: zero, as a trained model has them
                t[int(self.record.llm["vocab_size"]):] = 0
            return t

        def dtype(self, key):
            return torch.bfloat16

    os.makedirs(path)
    write_hf_vila(Random(), path)


def _digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            h = hashlib.sha256()
            with open(os.path.join(d, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            out[os.path.relpath(os.path.join(d, f), root)] = h.hexdigest()
    return out


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (reset at exec, unlike ru_maxrss on Linux, which a
    child started by fork + exec inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_one(argv) -> None:
    """Child: one conversion; prints {"seconds", "peak_rss_bytes"}."""
    src, dst, fmt = argv
    from megatron_longvila.conversion import convert

    base = _peak_rss()  # torch and megatron imported
    t0 = time.perf_counter()
    summary = convert(source=src, target=dst, target_format=fmt, progress=False)
    peak = _peak_rss()
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak, "baseline_rss_bytes": base,
                      "bytes": summary["bytes"]}))


def _load_rank(rank, world, path):
    """One rank of the sliced load: load at TP 2 x PP 2 (bf16 parameters), report its bytes read and time."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.conversion import load_longvila
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1)
    stats = {}
    t0 = time.perf_counter()
    model = load_longvila(path, params_dtype=torch.bfloat16, stats=stats)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    out = dict(stats, seconds=seconds, params=params, tp_rank=ps.get_tensor_model_parallel_rank(),
               pp_rank=ps.get_pipeline_model_parallel_rank())
    ps.destroy_model_parallel()
    return out


def sliced_load(path: str) -> dict:
    """Bytes read per rank by a TP 2 x PP 2 load of the HF folder `path`, against the whole checkpoint."""
    from megatron_longvila.parallel.launch import run_distributed

    whole = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                if f.endswith(".safetensors"))
    ranks = run_distributed(_load_rank, 4, path, timeout=3600)
    per_rank = []
    for r, one in enumerate(ranks):
        read = one["header_bytes"] + one["data_bytes"]
        per_rank.append({"rank": r, "tp": one["tp_rank"], "pp": one["pp_rank"], "header_bytes": one["header_bytes"],
                         "data_bytes": one["data_bytes"], "read_bytes": read, "of_checkpoint": round(read / whole, 3),
                         "params": one["params"], "seconds": round(one["seconds"], 1)})
    total = sum(r["read_bytes"] for r in per_rank)
    return {"layout": "TP 2 x PP 2, 4 gloo ranks", "checkpoint_safetensors_bytes": whole, "per_rank": per_rank,
            "all_ranks_read_bytes": total, "all_ranks_of_checkpoint": round(total / whole, 3),
            "unsliced_all_ranks_read_bytes": 4 * whole}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--shape", default="qwen2_1.5b", choices=sorted(SHAPES))
    p.add_argument("--load-only", action="store_true", help="only the sliced load (no conversion round trip)")
    p.add_argument("--run-one", nargs=3, metavar=("SRC", "DST", "FORMAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        _run_one(args.run_one)
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf, mcore, back = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back"))
    for d in (hf, mcore, back):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    write_random(hf, args.shape)
    made = time.perf_counter() - t0
    result = {"shape": args.shape, "dtype": "bf16", "write_random_seconds": round(made, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d")}
    result["sliced_load"] = sliced_load(hf)
    for name, src, dst, fmt in (() if args.load_only else (("hf_to_mcore", hf, mcore, "mcore"),
                                                           ("mcore_to_hf", mcore, back, "hf"))):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--run-one", src, dst, fmt],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        one = json.loads(r.stdout.strip().splitlines()[-1])
        result["checkpoint_bytes"] = one["bytes"]
        result[name] = {"seconds": round(one["seconds"], 1), "peak_rss_gib": round(one["peak_rss_bytes"] / 2**30, 2),
                        "peak_over_checkpoint": round(one["peak_rss_bytes"] / one["bytes"], 2),
                        "baseline_rss_gib": round(one["baseline_rss_bytes"] / 2**30, 2)}
    if not args.load_only:
        result["round_trip_byte_identical"] = _digest(hf) == _digest(back)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

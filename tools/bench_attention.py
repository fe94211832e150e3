#!/usr/bin/env python3
"""Benchmark MM-SP 2D attention on CPU ranks (gloo): exactness, communication against its minimum,
work balance and time, forward + backward.

  python tools/bench_attention.py --ulysses 2 --ring 2 --seq-lens 1000 37 5 --heads 8 --kv-heads 2 --json
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ulysses", type=int, default=2, help="Ulysses size U")
    p.add_argument("--ring", type=int, default=2, help="ring size R")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048], help="lengths of the packed documents")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--full", action="store_true", help="no causal mask")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--ring-first", action="store_true", help="ring ranks consecutive")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_longvila.attention.check import AttentionCheckConfig, run_attention_check

    cfg = AttentionCheckConfig(ulysses=a.ulysses, ring=a.ring, seq_lens=a.seq_lens, heads=a.heads,
                               kv_heads=a.kv_heads or a.heads, head_dim=a.head_dim, batch=a.batch,
                               causal=not a.full, dtype=a.dtype, backend=a.backend, iters=a.iters,
                               ring_first=a.ring_first)
    res = run_attention_check(cfg)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"mesh {a.ulysses}x{a.ring}  docs {a.seq_lens}  heads {cfg.heads}/{cfg.kv_heads}")
        print(f"  max |err| vs single process: {res['max_abs_err']:.3e}  rel {res['rel_err']}")
        print(f"  comm bytes/rank: measured {res['comm_bytes_measured']:,}  min {res['comm_bytes_min']:,}  "
              f"ratio {res['comm_ratio']:.4f}")
        print(f"  flops imbalance (max/mean): {res['flops_imbalance']:.4f}   time fwd+bwd {res['time_s']*1e3:.1f} ms")


if __name__ == "__main__":
    main()

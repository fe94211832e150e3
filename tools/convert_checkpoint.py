"""Convert LongVILA checkpoints between the Hugging Face VILA layout, this project's torch_dist (MCore) checkpoints
and NeMo 2, or start one from Hugging Face base models.

    # a released LongVILA / VILA checkpoint -> a project checkpoint padded for TP 2 x PP 2
    python tools/convert_checkpoint.py --source qwen2-7b-longvila-256f --target ckpt/longvila_mcore \\
        --target-format mcore --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    # any project checkpoint (after any training) -> VILA's layout, bf16
    python tools/convert_checkpoint.py --source ckpt/long_sft --target out/longvila_hf --target-format hf --dtype bf16
    # a stage-1 start from base models (the projector from --seed)
    python tools/convert_checkpoint.py --llm Qwen2-7B-Instruct --vision-tower siglip-so400m-patch14-384 \\
        --target ckpt/align_start --target-format mcore
    # NeMo 2 (context/ + weights/), and back
    python tools/convert_checkpoint.py --source ckpt/long_sft --target out/longvila_nemo --target-format nemo

The source format is detected (--source-format to insist). Only safetensors and torch_dist are read: pickled
`.bin` weights are refused (unpickling runs code; convert them with a trusted tool first), and torch_dist holds a
pickled index, so give it only checkpoints you trust. Tensors stream one at a time (peak memory about the largest
stacked tensor); the target is written under a temporary name and renamed at the end, so a killed conversion leaves
no target. Every missing, unexpected or misshaped tensor is listed in one error. A folder is trusted for nothing:
an index entry that is not a plain file name, a symlink out of the source, a crafted safetensors header, a target
overlapping the source are refused (exit status 2, one line) and leave the file system as it was.
docs/CONVERSION.md has the details.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--source", help="checkpoint folder: HF VILA (config.json, llm/, vision_tower/, mm_projector/), "
                                    "a project checkpoint (its --save folder or an iter_N folder), or NeMo 2")
    p.add_argument("--source-format", choices=["hf", "mcore", "nemo"], help="default: detected")
    p.add_argument("--llm", help="base models: a Qwen2 / Llama causal-LM folder (with --vision-tower)")
    p.add_argument("--vision-tower", help="base models: a SigLIP folder (SiglipVisionModel or SiglipModel)")
    p.add_argument("--target", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--target-format", required=True, choices=["hf", "mcore", "nemo"])
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="MCore/NeMo targets: the layout to pad the vocabulary for and check (recorded as default; "
                        "the checkpoint loads at any layout that divides it)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the source's")
    p.add_argument("--token-order", choices=["row_major", "column_major"], default=None,
                   help="the projector's token order, overriding the source's (or the reader's guess for VILA's "
                        "plain mlp_downsample: row-major for Qwen2 releases, column-major for Llama ones)")
    p.add_argument("--seed", type=int, default=0, help="base models: seed of the projector's initialization")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --target (never one that is, contains or lies inside a source: refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megatron_longvila.errors import ConversionError
    from megatron_longvila.conversion import convert

    try:
        summary = convert(source=args.source, source_format=args.source_format, llm=args.llm,
                          vision_tower=args.vision_tower, target=args.target, target_format=args.target_format,
                          tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, dtype=args.dtype,
                          overwrite=args.overwrite, token_order=args.token_order, seed=args.seed,
                          progress=not args.no_progress)
    except ConversionError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['target_format']} checkpoint {summary['target']} from {summary['source_format']} "
              f"({summary['bytes'] / 2**20:.1f} MiB of tensors in {summary['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ask a LongVILA checkpoint a question about a video or an image, on MM-SP inference (sharded KV cache).

    torchrun --nproc-per-node 8 examples/generate_longvila.py --load ckpt/long_sft --video clip.mp4 \
        --prompt "What happens in the video?" --hierarchical-context-parallel-sizes 8 1
    python examples/generate_longvila.py --cpu-ranks 4 --load longvila_demo/checkpoints \
        --video longvila_demo/data/videos/heldout_000.mp4 --prompt "What happens in the video?"

The checkpoint may be this project's (torch_dist with its model record), a Hugging Face VILA folder or NeMo 2.
The prompt goes through the training chat template (the checkpoint's); each rank decodes only the frames stage 1
gives it. Prints the answer; --json prints one object: answer, token ids, prompt tokens, prefill seconds, decode
tokens/s and the peak memory of every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Torch-free: the flags and files are checked before torch and megatron-core load (seconds) and any rank starts.
from megatron_longvila.checkpoint.locate import check_checkpoint_folder  # noqa: E402
from megatron_longvila.errors import ArgumentError  # noqa: E402
from megatron_longvila.parallel.sizes import add_parallel_args, check_parallel_args  # noqa: E402
from megatron_longvila.runtime.entry import ProjectArgumentParser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ProjectArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (this project's, HF VILA or NeMo 2)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model, tokenizer.json or a folder holding one (default: the checkpoint's "
                        "llm/ folder when it has one, else the byte tokenizer the CPU demo trains with)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", help="a video file")
    media.add_argument("--image", help="an image file")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from the video (default: the frames "
                                                                "per video the checkpoint's model was trained with, "
                                                                "from its record; else 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default=None, help="chat template (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return add_parallel_args(p)


def input_file(path: str, flag: str) -> None:
    """An input file the ranks will read: present, a file, readable (ArgumentError naming `flag` otherwise)."""
    if not os.path.exists(path):
        raise ArgumentError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise ArgumentError(f"{flag} {path}: a folder, not a file")
    if not os.access(path, os.R_OK):
        raise ArgumentError(f"{flag} {path}: not readable")


def check_inputs(args) -> None:
    """Every mistake the command line can hold, refused in one line before any rank starts (ArgumentError): the mesh
    against the rank count, the checkpoint folder, the media and tokenizer files, the sampling settings."""
    check_parallel_args(args)
    check_checkpoint_folder(args.load, "--load")
    if args.video is not None:
        input_file(args.video, "--video")
    if args.image is not None:
        input_file(args.image, "--image")
    if args.tokenizer_model is not None and not os.path.exists(args.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file or folder")
    if args.num_frames is not None and args.num_frames < 1:
        raise ArgumentError(f"--num-frames {args.num_frames}: give 1 or more")
    if args.max_new_tokens < 1:
        raise ArgumentError(f"--max-new-tokens {args.max_new_tokens}: give 1 or more")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ArgumentError(f"--temperature {args.temperature} --top-k {args.top_k} --top-p {args.top_p}: "
                            f"temperature >= 0, top-k >= 0 and 0 < top-p <= 1 are required")


def _peak_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args):
    import torch
    import torch.distributed as dist

    from megatron_longvila.inference import generate, prompts
    from megatron_longvila.inference.session import load_model, start, tokenizer_for
    from megatron_longvila.plan.frames import tokens_per_frame
    from megatron_longvila.models.record import media_settings

    start(args)
    model, mesh = load_model(args.load, args)
    rec = model.record
    tok = tokenizer_for(args.load, args.tokenizer_model, rec)  # the checkpoint's special tokens, at its ids
    template = args.template or rec.tokenizer.get("template") or "chatml"
    size = int(rec.vision["image_size"])
    tpf = tokens_per_frame(size, size, int(rec.vision["patch_size"]))
    media = media_settings(rec, args)  # what the checkpoint's model saw in training (VILA's configs when converted)
    pre = dict(image_mode=media["image_mode"], image_mean=media["image_mean"], image_std=media["image_std"])
    if args.video:
        prompt = prompts.video_prompt(tok, args.prompt, args.video, template=template, tokens_per_frame=tpf,
                                      image_size=size, num_frames=media["num_frames"],
                                      frame_separator=media["frame_separator"], **pre)
    elif args.image:
        prompt = prompts.image_prompt(tok, args.prompt, args.image, template=template, tokens_per_frame=tpf,
                                      image_size=size, **pre)
    else:
        prompt = prompts.text_prompt(tok, args.prompt, template=template)
    stats = []
    t0 = time.perf_counter()
    ids = generate(model, [prompt], mesh, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=prompts.stop_ids(tok, template), seed=args.seed,
                   stats=stats)[0]
    st = stats[0]
    peak = torch.tensor([_peak_gb()], dtype=torch.float64)
    gathered = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, peak.cuda() if torch.cuda.is_available() else peak)
    stop = prompts.stop_ids(tok, template)
    text = tok.decode([i for i in ids if i not in stop])
    return {"answer": text, "token_ids": ids, "prompt_tokens": st["prompt_tokens"], "prefill_s": st["prefill_s"],
            "decode_tokens_per_s": (len(ids) - 1) / st["decode_s"] if st["decode_s"] > 0 and len(ids) > 1 else None,
            "seconds": time.perf_counter() - t0, "peak_memory_gb_per_rank": [float(g) for g in gathered],
            "mesh": f"{mesh.ulysses_size}x{mesh.ring_size}", "kv_bytes_rank0": st["kv_bytes"],
            "num_frames": media["num_frames"] if args.video else None}


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_inputs(args)
    from megatron_longvila.inference.session import launch

    out = launch(run, args)
    if out is None:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(out) if args.json else out["answer"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # a mistake: one line, once, status 2

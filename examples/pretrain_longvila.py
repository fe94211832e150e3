"""Train LongVILA with MM-SP on Megatron-Core, in the shape of Megatron-LM's pretrain_*.py.

Run on GPUs (one process per GPU):
    torchrun --nproc-per-node 8 examples/pretrain_longvila.py --recipe long_sft \
        --tensor-model-parallel-size 1 --context-parallel-size 8 --hierarchical-context-parallel-sizes 8 1 \
        --data-path data/long_sft.jsonl --tokenizer-model qwen2/tokenizer.json --train-iters 1000 \
        --save ckpt/long_sft --load ckpt/long_sft --pretrained-checkpoint ckpt/context_extension --bf16
(examples/slurm/ has the multi-node sbatch scripts.)

The CPU demo (no GPU needed): generates a small dataset of real encoded videos, then trains a tiny LongVILA
on 4 CPU ranks (a 2x2 MM-SP mesh) and ends with a checkpoint and a summary:
    python examples/pretrain_longvila.py --demo

The providers below have Megatron's signatures. With a Megatron-LM checkout importable and
--use-megatron-training, `megatron.training.pretrain` drives them instead of megatron_longvila.training.loop
(megatron_longvila.training.megatron_lm; commit and commands in docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone

from megatron_longvila.training.loop import pretrain  # noqa: E402

_STATE = {}


def get_args():
    """The run's arguments, from whichever trainer runs (imported here: megatron_lm loads megatron-core's models,
    which --help does not need)."""
    from megatron_longvila.training.megatron_lm import get_args as either_trainers_args

    return either_trainers_args()


# ------------------------------------------------------------------------------------------------------
# Extra arguments (LongVILA's, on top of Megatron's)
# ------------------------------------------------------------------------------------------------------

def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("example")
    g.add_argument("--demo", action="store_true", help="generate a tiny video dataset and train on 4 CPU ranks")
    g.add_argument("--demo-dir", default="longvila_demo", help="where --demo writes its data and checkpoints")
    g.add_argument("--demo-ranks", type=int, default=4)
    g.add_argument("--use-megatron-training", action="store_true",
                   help="drive the providers with megatron.training.pretrain (needs a Megatron-LM checkout)")
    return parser


def _tokenizer():
    from megatron_longvila.training.providers import checkpoint_record
    from megatron_longvila.data.tokenizer import load_tokenizer_for

    if "tokenizer" not in _STATE:  # with the special tokens (and their ids) of the checkpoint the run starts from
        _STATE["tokenizer"] = load_tokenizer_for(get_args().tokenizer_model, checkpoint_record(get_args()))
    return _STATE["tokenizer"]


# ------------------------------------------------------------------------------------------------------
# Providers (Megatron's signatures); the work is in megatron_longvila.training.providers and .step
# ------------------------------------------------------------------------------------------------------

def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """LongVILA for this rank (encoder and projector on the first pipeline stage), frozen per the recipe; its
    shape from --llm / --vision-encoder, or from the checkpoint the run loads."""
    from megatron_longvila.training.providers import build_model, build_step

    if vp_stage is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage: LongVILA's model provider builds one chunk per "
                         "pipeline stage; drop the flag")
    model = build_model(get_args(), _tokenizer(), pre_process, post_process)
    _STATE["step"] = build_step(get_args(), model, _tokenizer())
    return model


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Packed micro-batches from JSONL manifests, one stream per data-parallel replica (resumable), read by the
    step as planned micro-batches."""
    from megatron.core import parallel_state as ps

    from megatron_longvila.training.providers import build_streams

    return build_streams(get_args(), _tokenizer(), _STATE["step"], ps.get_data_parallel_rank(),
                         ps.get_data_parallel_world_size())


def forward_step(data_iterator, model):
    """One planned micro-batch: this rank's frames decoded and encoded, MM-SP forward (training.step)."""
    return _STATE["step"].forward_step(data_iterator, model)


# ------------------------------------------------------------------------------------------------------
# The CPU demo
# ------------------------------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 210, 30)}
MOTIONS = ("left", "right", "up", "down")


def _ffmpeg() -> str:
    import shutil

    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise SystemExit("--demo needs an ffmpeg binary to encode its videos: pip install imageio-ffmpeg "
                             "(or apt-get install ffmpeg)") from None
        return exe


def write_demo_dataset(root: str, num_videos: int = 32, frames: int = 16, size: int = 64) -> str:
    """Real H.264 videos (a coloured square moving one way) and a JSONL manifest asking what happens."""
    import subprocess

    import numpy as np

    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    manifest = os.path.join(root, "train.jsonl")
    if os.path.isfile(manifest):
        return manifest
    exe = _ffmpeg()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_videos):
        color = list(COLORS)[i % len(COLORS)]
        motion = MOTIONS[(i // len(COLORS)) % len(MOTIONS)]
        x0, y0 = rng.integers(8, size - 24, size=2)
        step = {"left": (-2, 0), "right": (2, 0), "up": (0, -2), "down": (0, 2)}[motion]
        video = np.full((frames, size, size, 3), 96, dtype=np.uint8)
        for t in range(frames):
            x = int(np.clip(x0 + step[0] * t, 0, size - 16))
            y = int(np.clip(y0 + step[1] * t, 0, size - 16))
            video[t, y:y + 16, x:x + 16] = COLORS[color]
        path = os.path.join(root, "videos", f"clip_{i:03d}.mp4")
        subprocess.run([exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
                        "-r", "8", "-i", "-", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path],
                       input=video.tobytes(), check=True)
        lines.append({"id": f"clip_{i:03d}", "video": os.path.relpath(path, root), "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in the video?"},
            {"from": "gpt", "value": f"A {color} square moves {motion}."}]})
    with open(manifest + ".tmp", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return manifest


DEMO_FLAGS = [
    "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
    "--tensor-model-parallel-size", "1", "--context-parallel-size", "4",
    "--hierarchical-context-parallel-sizes", "2", "2",
    "--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--train-iters", "40", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "4", "--clip-grad", "1.0",
    "--num-frames", "8", "--save-interval", "20", "--log-interval", "5", "--seed", "1234",
]


def _demo_rank(rank: int, world: int, port: int, argv: list, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from megatron_longvila.runtime.entry import run_main

    holder = {}
    status = run_main(lambda: holder.setdefault("result", main(argv)))
    if status:
        sys.exit(status)  # the message was printed once, by rank 0
    result = holder.get("result")
    if rank == world - 1 and result is not None:
        with open(os.path.join(_flag(argv, "--save"), "demo_summary.json"), "w") as f:
            json.dump({"losses": result.losses, "tokens_per_s": result.tokens_per_s, "saved": result.saved}, f)


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def run_demo(user_argv: list) -> int:
    """Generate the dataset, then launch the 4 CPU ranks (gloo), each running `main` like torchrun would."""
    import multiprocessing as mp
    import socket

    ns, rest = extra_args_provider(argparse.ArgumentParser(add_help=False)).parse_known_args(user_argv)
    root = os.path.abspath(ns.demo_dir)
    t0 = time.perf_counter()
    manifest = write_demo_dataset(os.path.join(root, "data"))
    print(f"demo data: {manifest} ({time.perf_counter() - t0:.1f}s)", flush=True)
    save = os.path.join(root, "checkpoints")
    argv = DEMO_FLAGS + ["--data-path", manifest, "--save", save, "--load", save] + rest
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = ns.demo_ranks
    threads = max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_demo_rank, args=(r, world, port, argv, threads)) for r in range(world)]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join()
        codes.append(p.exitcode)
    if any(codes):
        print(f"demo failed: rank exit codes {codes}", file=sys.stderr)
        return 1
    with open(os.path.join(save, "demo_summary.json")) as f:
        summary = json.load(f)
    losses = {int(k): v for k, v in summary["losses"].items()}
    if not losses:
        print(f"nothing to train: {save} already holds the final checkpoint (remove {root} to train again)")
        return 0
    first, last = min(losses), max(losses)
    tps = summary["tokens_per_s"]
    print(f"\nLongVILA demo done in {time.perf_counter() - t0:.0f}s on {world} CPU ranks (MM-SP 2x2 mesh): "
          f"loss {losses[first]:.3f} (iteration {first}) -> {losses[last]:.3f} (iteration {last}), "
          f"{sum(tps) / len(tps):,.0f} tokens/s; checkpoint: {summary['saved'][-1] if summary['saved'] else save}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = extra_args_provider(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    if pre.use_megatron_training:  # needs a Megatron-LM checkout on PYTHONPATH (docs/TRAINING.md)
        from megatron_longvila.training import megatron_lm
        from megatron_longvila.errors import ArgumentError

        try:
            import megatron.training  # noqa: F401
        except ImportError:
            raise ArgumentError("--use-megatron-training needs Megatron-LM's megatron.training, which megatron-core's "
                                "wheel does not ship: put a Megatron-LM checkout at core_v0.16.1 on PYTHONPATH "
                                "(docs/TRAINING.md), or drop the flag to train with the project's loop") from None

        return megatron_lm.pretrain(train_valid_test_datasets_provider, model_provider, forward_step,
                                    extra_args_provider=extra_args_provider, argv=argv)
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step,
                    extra_args_provider=extra_args_provider, argv=argv)


if __name__ == "__main__":
    if "--demo" in sys.argv[1:] and not {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(run_demo([a for a in sys.argv[1:] if a != "--demo"]))
    from torch.distributed.elastic.multiprocessing.errors import record

    from megatron_longvila.runtime.entry import run_main

    # record: a rank's unexpected failure reaches torchrun's summary with its traceback; configuration errors are
    # reported once by run_main instead.
    sys.exit(record(run_main)(main))

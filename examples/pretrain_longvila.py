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
from dataclasses import replace
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone

from megatron_longvila.training.loop import pretrain  # noqa: E402
from megatron_longvila.training.megatron_lm import get_args  # noqa: E402  (either trainer's arguments)

_STATE = {}


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
    from megatron_longvila.data.tokenizer import load_tokenizer

    if "tokenizer" not in _STATE:
        _STATE["tokenizer"] = load_tokenizer(get_args().tokenizer_model)
    return _STATE["tokenizer"]


def _frame_size() -> int:
    from megatron_longvila.models.registry import ENCODERS

    return ENCODERS[get_args().vision_encoder].image_size


# ------------------------------------------------------------------------------------------------------
# Model provider
# ------------------------------------------------------------------------------------------------------

def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """LongVILA for this rank (encoder and projector on the first pipeline stage), frozen per the recipe."""
    from megatron_longvila.attention.megatron_core import initialize_mmsp
    from megatron_longvila.models.freezing import apply_freezing
    from megatron_longvila.models.registry import LLMS, build_longvila

    args = get_args()
    if vp_stage is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage: LongVILA's model provider builds one chunk per "
                         "pipeline stage; drop the flag")
    tok = _tokenizer()
    shape = LLMS[args.llm]
    unit = args.make_vocab_size_divisible_by
    if unit % args.tensor_model_parallel_size:
        raise ValueError(f"--make-vocab-size-divisible-by {unit} must be a multiple of --tensor-model-parallel-size")
    # The padded vocabulary must not depend on TP, or checkpoints would not reshard across TP sizes.
    vocab = -(-max(shape.vocab_size, tok.vocab_size) // unit) * unit
    shape = replace(shape, vocab_size=vocab, rotary_base=args.rotary_base or shape.rotary_base,
                    max_position_embeddings=max(shape.max_position_embeddings, args.seq_length))
    model = build_longvila(
        encoder=args.vision_encoder, projector=args.projector, llm=shape,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, pre_process=pre_process,
        post_process=post_process, media_token_id=tok.image_token_id,
        llm_overrides={"calculate_per_token_loss": True, "sequence_parallel": args.sequence_parallel,
                       "bf16": args.bf16})
    _STATE["mesh"] = initialize_mmsp(model.config, seq_length=args.seq_length, packed=True)
    apply_freezing(model, args.freeze)
    return model


# ------------------------------------------------------------------------------------------------------
# Dataset provider
# ------------------------------------------------------------------------------------------------------

def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Packed micro-batches from JSONL manifests, one stream per data-parallel replica (resumable)."""
    from megatron.core import parallel_state as ps

    from megatron_longvila.data.dataset import DataConfig, PackedIterator, VideoTextDataset
    from megatron_longvila.models.projector import tokens_per_frame
    from megatron_longvila.models.registry import ENCODERS

    args = get_args()
    enc = ENCODERS[args.vision_encoder]
    cfg = DataConfig(template=args.template, tokens_per_frame=tokens_per_frame(enc.image_size, enc.image_size,
                                                                                enc.patch_size),
                     num_frames=args.num_frames or 8, max_seq_len=args.seq_length, seed=args.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def stream(path):
        ds = VideoTextDataset(path, _tokenizer(), cfg, dp_rank=dp_rank, dp_size=dp_size)
        return PackedIterator(ds, args.seq_length)

    valid = stream(args.valid_data_path) if args.valid_data_path else None
    return stream(args.data_path), valid, None


# ------------------------------------------------------------------------------------------------------
# Forward step
# ------------------------------------------------------------------------------------------------------

def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def loss_func(total_weight: float, output_tensor: torch.Tensor):
    """This rank's share of the micro-batch's weighted mean -> Megatron's (sum, tokens, report) triple.

    The model returns sum(local weighted CE) / W (W: the micro-batch's total loss weight), so the CP shares
    add up to the micro-batch mean. Multiplied back by W it is a sum; W is counted once per CP group, and
    Megatron divides by the tokens counted over DP x CP and all micro-batches: the global token mean.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    loss_sum = output_tensor.float() * total_weight
    count = int(round(total_weight)) if ps.get_context_parallel_rank() == 0 else 0
    report = torch.tensor([float(loss_sum.detach()), float(count)], dtype=torch.float64)
    dist.all_reduce(report, group=ps.get_data_parallel_group(with_context_parallel=True))
    return loss_sum, torch.tensor(count, dtype=torch.int), {"lm loss": report}


def forward_step(data_iterator, model):
    """One packed micro-batch: stage-1 frame assignment, decode only this rank's frames, MM-SP forward."""
    from megatron_longvila.data.dataset import decode_media
    from megatron_longvila.data.image_processor import SiglipImageProcessor
    from megatron_longvila.models.longvila import MicroBatch, shift_targets
    from megatron_longvila.parallel.sharding import plan_sequence

    args = get_args()
    mesh = _STATE["mesh"]
    packed = next(data_iterator)
    m = _unwrap(model)
    size = _frame_size()
    mb = MicroBatch.from_packed(packed, [None] * len(packed.media), [(size, size)] * len(packed.media))
    from megatron_longvila.attention.megatron_core import get_mmsp_config

    mmsp = get_mmsp_config()
    uniform = bool(mmsp.uniform_shards)
    if uniform and mb.total_len < args.seq_length:
        mb = _fill_to(mb, args.seq_length, _tokenizer().pad_id)
    if m.pre_process and mb.frames:
        plan = plan_sequence(mesh, mb.seq_lens, uniform=uniform, pad_to_multiple=mmsp.pad_to_multiple)
        mine = m.assign(mb, plan).frames_of(mesh.cp_rank)
        failed = torch.zeros(len(packed.media))
        if mine:
            proc = _STATE.setdefault("processor", SiglipImageProcessor(size, mode="pad"))
            decoded = decode_media(packed, mine, processor=proc, on_error="blank")
            for g, px in zip(mine, decoded.pixels):
                mb.frames[g].pixels = px
            for media, _ in decoded.failed:
                failed[media] = 1
        _drop_documents_with_failed_media(mb, packed, failed, mesh, args)
    weight = float(shift_targets(mb.labels, mb.loss_weights, mb.seq_lens)[1].sum())
    if weight != round(weight):
        raise ValueError("per-token loss needs integral token weights: use loss_weight 1 in the manifest and "
                         "DataConfig loss weights of 1")
    output = model(mb, mesh, uniform=uniform, pad_to_multiple=mmsp.pad_to_multiple)
    return output, partial(loss_func, weight)


def _drop_documents_with_failed_media(mb, packed, failed, mesh, args) -> None:
    """A file that passed the dataset's checks can still fail to decode here, on one rank, after every rank
    has committed to this micro-batch. Its frames were blanked so the ranks stay in step; the documents that
    use them must not be learned from. The CP ranks of this stage agree on the failures (a CP all-reduce,
    safe here: all of them run this step for the same micro-batch) and drop those documents from the loss.
    Under pipeline parallelism the loss lives on the last stage, which does not decode: there the failures
    are only counted and logged."""
    from megatron_longvila.models.longvila import IGNORE_INDEX
    from megatron_longvila.parallel import comm

    if mesh.cp_size > 1:
        comm.all_reduce(failed, mesh.cp_group, op=torch.distributed.ReduceOp.MAX, kind="decode_failures")
    if not failed.any():
        return
    _STATE["blanked_media"] = _STATE.get("blanked_media", 0) + int(failed.sum())
    if args.pipeline_model_parallel_size > 1:
        print(f"[data] {int(failed.sum())} media item(s) failed to decode and were blanked (not dropped from the "
              f"loss under pipeline parallelism)", flush=True)
        return
    ends = torch.cumsum(torch.tensor(mb.seq_lens), 0)
    for media in failed.nonzero().flatten().tolist():
        doc = int(torch.searchsorted(ends, packed.media[media].frame_offsets[0], right=True))
        start = int(ends[doc - 1]) if doc else 0
        mb.labels[start:int(ends[doc])] = IGNORE_INDEX
        mb.loss_weights[start:int(ends[doc])] = 0
    print(f"[data] dropped the documents of {int(failed.sum())} media item(s) that failed to decode from this "
          f"micro-batch's loss", flush=True)


def _fill_to(mb, length: int, pad_id: int):
    """Append a filler document (no loss) so the sequence has exactly --seq-length tokens (pipeline shapes)."""
    from megatron_longvila.models.longvila import IGNORE_INDEX, MicroBatch

    n = length - mb.total_len
    return MicroBatch(input_ids=torch.cat([mb.input_ids, torch.full((n,), pad_id, dtype=torch.long)]),
                      labels=torch.cat([mb.labels, torch.full((n,), IGNORE_INDEX, dtype=torch.long)]),
                      loss_weights=torch.cat([mb.loss_weights, torch.zeros(n)]),
                      position_ids=torch.cat([mb.position_ids, torch.arange(n)]), seq_lens=mb.seq_lens + [n],
                      frames=mb.frames)


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
    result = main(argv)
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
    # megatron-core warns at import about optional GPU packages (TE, apex) a CPU demo never needs.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
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

        return megatron_lm.pretrain(train_valid_test_datasets_provider, model_provider, forward_step,
                                    extra_args_provider=extra_args_provider, argv=argv)
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step,
                    extra_args_provider=extra_args_provider, argv=argv)


if __name__ == "__main__":
    if "--demo" in sys.argv[1:]:
        sys.exit(run_demo([a for a in sys.argv[1:] if a != "--demo"]))
    main()

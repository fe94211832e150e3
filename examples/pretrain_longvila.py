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

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 210, 30)}
MOTIONS = ("left", "right", "up", "down")
QUESTION = "What happens in the video?"
DEMO_VIDEOS = dict(num_videos=768, heldout_per_combination=4)
"""The demo's clips: 48 training clips per colour and direction (fewer generalize worse: with 6 per combination
the model answers its training clips and misses a third of new ones), and 4 held-out clips per combination."""


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
    g.add_argument("--demo-clips", type=int, default=DEMO_VIDEOS["num_videos"],
                   help="--demo: training clips, spread evenly over every colour and direction")
    g.add_argument("--demo-heldout", type=int, default=DEMO_VIDEOS["heldout_per_combination"],
                   help="--demo: held-out clips per colour and direction, asked about after training")
    g.add_argument("--demo-colors", nargs="+", default=list(COLORS), choices=list(COLORS),
                   help="--demo: the clips' colours")
    g.add_argument("--demo-motions", nargs="+", default=list(MOTIONS), choices=list(MOTIONS),
                   help="--demo: the clips' directions")
    g.add_argument("--use-megatron-training", action="store_true",
                   help="drive the providers with megatron.training.pretrain (needs a Megatron-LM checkout)")
    g = parser.add_argument_group("dry run (no launcher, no device, no Transformer Engine needed)")
    g.add_argument("--dry-run", action="store_true",
                   help="check this launch for --world-size ranks as a real launch would, and print what it builds: "
                        "mesh, the three TransformerConfigs with each value's source, layer specs, kernels, memory")
    g.add_argument("--world-size", type=int, default=None, help="--dry-run: the ranks the launch starts")
    g.add_argument("--gpus-per-node", type=int, default=None, help="--dry-run: ranks per node (default min(N, 8))")
    g.add_argument("--gpu", default=None, help="--dry-run: the GPU kind (h100, h200, gb200): the memory verdict")
    g.add_argument("--json", action="store_true", help="--dry-run: print one JSON object")
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


def caption(color: str, motion: str) -> str:
    return f"A {color} square moves {motion}."


CODECS = {"h264": (".mp4", ["-c:v", "libx264", "-preset", "ultrafast"]),
          "vp9": (".webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"])}
"""The demo's video codecs: H.264 (decoded everywhere), VP9 (what DALI's CPU decoder reads)."""


def _write_clips(root: str, name: str, specs, frames: int, size: int, rng, codec: str = "h264") -> str:
    """Clips (H.264, or VP9) of a coloured square moving one way over a grey background, and their manifest
    `name`.jsonl. specs: (clip id, colour, motion) per clip. The start position, speed and background vary per clip."""
    import subprocess

    import numpy as np

    manifest = os.path.join(root, f"{name}.jsonl")
    if os.path.isfile(manifest):
        return manifest
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    exe = _ffmpeg()
    lines = []
    side = size // 4
    for clip, color, motion in specs:
        speed = float(rng.uniform(2.4, 3.0)) * size / 64  # pixels per frame: most of the way across
        travel = speed * (frames - 1)
        lo, hi = 0, size - side
        # Start where the whole travel fits, so the square never stops at the border.
        x0 = rng.uniform(lo + (travel if motion == "left" else 0), hi - (travel if motion == "right" else 0))
        y0 = rng.uniform(lo + (travel if motion == "up" else 0), hi - (travel if motion == "down" else 0))
        dx, dy = {"left": (-speed, 0), "right": (speed, 0), "up": (0, -speed), "down": (0, speed)}[motion]
        video = np.full((frames, size, size, 3), int(rng.integers(80, 130)), dtype=np.uint8)
        for t in range(frames):
            x, y = int(round(x0 + dx * t)), int(round(y0 + dy * t))
            video[t, y:y + side, x:x + side] = COLORS[color]
        ext, encode = CODECS[codec]
        path = os.path.join(root, "videos", f"{clip}{ext}")
        subprocess.run([exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
                        "-r", "8", "-i", "-", *encode, "-pix_fmt", "yuv420p", path],
                       input=video.tobytes(), check=True)
        lines.append({"id": clip, "video": os.path.relpath(path, root), "conversations": [
            {"from": "human", "value": f"<video>\n{QUESTION}"},
            {"from": "gpt", "value": caption(color, motion)}]})
    with open(manifest + ".tmp", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return manifest


def write_demo_dataset(root: str, num_videos: int = 32, frames: int = 16, size: int = 64, *,
                       heldout_per_combination: int = 0, seed: int = 0, colors=None, motions=None,
                       codec: str = "h264"):
    """Real H.264 (or, codec="vp9", VP9) videos (a coloured square moving one way) and a JSON Lines manifest asking
    what happens.

    Colour and direction vary independently: clip i of `num_videos` (train.jsonl) has colour i mod C and direction
    (i div C) mod M (C colours, M directions: all four of each by default), so every combination gets the same
    number of clips when num_videos is a multiple of C x M. With heldout_per_combination > 0, heldout.jsonl holds that
    many more clips of every combination, drawn by the same generator with another seed, that training never sees.
    Returns train.jsonl's path, or (train.jsonl's, heldout.jsonl's) with held-out clips.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    colors = list(colors or COLORS)
    motions = list(motions or MOTIONS)
    nc, nm = len(colors), len(motions)
    train = [(f"clip_{i:03d}", colors[i % nc], motions[(i // nc) % nm]) for i in range(num_videos)]
    manifest = _write_clips(root, "train", train, frames, size, rng, codec)
    if not heldout_per_combination:
        return manifest
    heldout = [(f"heldout_{k:03d}", c, m) for k, (c, m) in
               enumerate((c, m) for _ in range(heldout_per_combination) for m in motions for c in colors)]
    return manifest, _write_clips(root, "heldout", heldout, frames, size, np.random.default_rng(seed + 1), codec)


DEMO_FLAGS = [
    "--cpu",  # the demo runs on CPU ranks (gloo)
    # Stage 2's recipe: the (randomly initialized) encoder stays frozen, a fixed random feature map, while the
    # projector and the LLM learn to read it; training the tiny encoder from scratch too took more than twice the steps.
    "--recipe", "pretrain", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
    "--tensor-model-parallel-size", "1", "--context-parallel-size", "4",
    "--hierarchical-context-parallel-sizes", "2", "2",
    "--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--train-iters", "600", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "10", "--clip-grad", "1.0",
    # Two frames, the first and the last: the direction is where the square went between them.
    "--num-frames", "2", "--save-interval", "300", "--log-interval", "50", "--seed", "1234",
]
SHOWN = 3
"""Held-out clips the demo asks about by generation at the end."""


def evaluate_heldout(load: str, heldout: str, *, show: int = SHOWN, max_new_tokens: int = 40) -> dict:
    """Ask the model saved in `load` about every held-out clip, on this run's ranks and MM-SP mesh (every rank calls
    it, with Megatron's parallel state initialized).

    Accuracy is teacher-forced: one forward of question + true answer per clip, and an attribute counts as right when
    the model's top token is the true one at each of its positions. Greedy generation writes exactly the true answer
    if and only if that holds at every answer position, so `both` (colour and direction right, and the rest of the
    caption) is greedy generation's exact-match accuracy, at one forward per clip instead of one per token. The first
    `show` clips are also answered by MM-SP generation (greedy), which is what is printed.
    """
    from megatron_longvila.conversion import load_longvila
    from megatron_longvila.data.conversation import MediaFrames, tokenize_conversation
    from megatron_longvila.data.tokenizer import load_tokenizer_for
    from megatron_longvila.inference import generate, prompts, score
    from megatron_longvila.models.record import media_settings
    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.plan.frames import tokens_per_frame

    model = load_longvila(load, hierarchical_context_parallel_sizes=_hier_sizes(),
                          llm_overrides={"calculate_per_token_loss": True})
    model.eval()
    mesh = initialize_mmsp(model.config)
    rec = model.record
    tok = load_tokenizer_for(None, rec)
    template = rec.tokenizer.get("template") or "chatml"
    size = int(rec.vision["image_size"])
    tpf = tokens_per_frame(size, size, int(rec.vision["patch_size"]))
    media = media_settings(rec)  # frames per video, preprocessing: what training used, from the record
    base = os.path.dirname(heldout)
    rows = [json.loads(line) for line in open(heldout)]
    # The clips shown: spread over the set, so they differ in colour and direction.
    shown = set(range(0, len(rows), max(1, len(rows) // show + 1))) if show else set()
    results = []
    for k, row in enumerate(rows):
        path = os.path.join(base, row["video"])
        truth = row["conversations"][1]["value"]
        prompt = prompts.video_prompt(tok, QUESTION, path, template=template, tokens_per_frame=tpf, image_size=size,
                                      num_frames=media["num_frames"], frame_separator=media["frame_separator"],
                                      image_mode=media["image_mode"], image_mean=media["image_mean"],
                                      image_std=media["image_std"])
        # The learned tokens of the true answer, exactly as training lays them out (answer and end of turn).
        full = tokenize_conversation([{"from": "human", "value": "<video>\n" + QUESTION},
                                      {"from": "gpt", "value": truth}],
                                     [MediaFrames("video", path, [0] * media["num_frames"])], tok, template,
                                     tokens_per_frame=tpf, frame_separator=media["frame_separator"])
        answer = full.labels[full.labels != -100].tolist()
        top = score(model, [prompt], [answer], mesh)[0].predicted
        right = [int(a) == int(b) for a, b in zip(top, answer)]
        color, motion = truth[2:].split(" square moves ")
        motion = motion.rstrip(".")
        text = tok.decode(answer)
        cpos, mpos = text.index(color), text.index(motion)

        def ok(start, n):  # the attribute's tokens (bytes) all right
            return all(right[start:start + n])

        out = {"id": row["id"], "video": path, "truth": truth, "color": ok(cpos, len(color)),
               "direction": ok(mpos, len(motion)), "both": all(right)}
        if k in shown:
            ids = generate(model, [prompt], mesh, max_new_tokens=max_new_tokens,
                           eos_id=prompts.stop_ids(tok, template))[0]
            stop = prompts.stop_ids(tok, template)
            out["answer"] = tok.decode([i for i in ids if i not in stop]).strip()
        results.append(out)
    n = len(results)
    return {"clips": n, "color": sum(r["color"] for r in results) / n,
            "direction": sum(r["direction"] for r in results) / n, "both": sum(r["both"] for r in results) / n,
            "frames_per_video": media["num_frames"], "question": QUESTION,
            "examples": [{k: r[k] for k in ("id", "video", "answer", "truth")} for r in results if "answer" in r]}


def _hier_sizes():
    from megatron.core import parallel_state as ps

    groups = ps.get_hierarchical_context_parallel_groups(check_initialized=False)
    if ps.get_context_parallel_world_size() == 1 or not groups:
        return None
    import torch.distributed as dist

    return [dist.get_world_size(groups[0]), dist.get_world_size(groups[1])]


def _demo_rank(rank: int, world: int, port: int, argv: list, threads: int, heldout: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from megatron_longvila.runtime.entry import run_main

    holder = {}
    t0 = time.perf_counter()
    status = run_main(lambda: holder.setdefault("result", main(argv)))
    if status:
        sys.exit(status)  # the message was printed once (rank 0, or the rank that raised it)
    train_s = time.perf_counter() - t0
    result = holder.get("result")
    save = _flag(argv, "--save")
    evaluation = None
    if result is not None and os.path.isfile(heldout):
        evaluation = evaluate_heldout(save, heldout)
    if rank == world - 1 and result is not None:
        at = max(i for i, a in enumerate(argv) if a == "--hierarchical-context-parallel-sizes")
        u, r = (int(x) for x in argv[at + 1:at + 3])
        with open(os.path.join(save, "demo_summary.json"), "w") as f:
            json.dump({"losses": result.losses, "tokens_per_s": result.tokens_per_s, "saved": result.saved,
                       "start_iteration": result.start_iteration, "train_seconds": train_s,
                       "mesh": {"ulysses": u, "ring": r, "ranks": world}, "heldout": evaluation}, f, indent=1)


def _flag(argv, name, default=None):
    # The last occurrence wins, as in argparse.
    idx = [i for i, a in enumerate(argv) if a == name]
    return argv[idx[-1] + 1] if idx else default


def run_demo(user_argv: list) -> int:
    """Generate the dataset, then launch the CPU ranks (gloo), each running `main` like torchrun would, then ask the
    trained model about held-out clips on the same ranks."""
    import multiprocessing as mp
    import socket

    from megatron_longvila.checkpoint.layout import read_tracker

    ns, rest = extra_args_provider(argparse.ArgumentParser(add_help=False)).parse_known_args(user_argv)
    root = os.path.abspath(ns.demo_dir)
    save = os.path.join(root, "checkpoints")
    argv = DEMO_FLAGS + ["--save", save, "--load", save] + rest
    iters = int(_flag(argv, "--train-iters"))
    done = read_tracker(save) if os.path.isdir(save) else None
    if done is not None and done >= iters:
        print(f"{save} already holds the demo's final checkpoint (iteration {done}): train longer with "
              f"make demo ARGS=\"--train-iters {2 * done}\", or start over with rm -rf {ns.demo_dir}")
        return 0
    t0 = time.perf_counter()
    videos = dict(num_videos=ns.demo_clips, heldout_per_combination=ns.demo_heldout, colors=ns.demo_colors,
                  motions=ns.demo_motions)
    data = os.path.join(root, "data")
    marker = os.path.join(data, "demo_settings.json")
    if os.path.isfile(marker) and json.load(open(marker)) != videos:
        print(f"{data} holds clips made with other settings ({marker}): start over with rm -rf {ns.demo_dir}, or "
              f"give another --demo-dir", file=sys.stderr)
        return 2
    if os.path.isdir(data) and not os.path.isfile(marker):
        print(f"{data} holds an older demo's data: start over with rm -rf {ns.demo_dir}, or give another --demo-dir",
              file=sys.stderr)
        return 2
    if ns.demo_heldout < 1:
        print("--demo-heldout: give at least 1 held-out clip per colour and direction", file=sys.stderr)
        return 2
    manifest, heldout = write_demo_dataset(data, **videos)
    with open(marker, "w") as f:
        json.dump(videos, f)
    print(f"demo data: {manifest} and {heldout} ({time.perf_counter() - t0:.1f}s)", flush=True)
    argv += ["--data-path", manifest]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = ns.demo_ranks
    threads = max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_demo_rank, args=(r, world, port, argv, threads, heldout)) for r in range(world)]
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
    first, last = min(losses), max(losses)
    tps = summary["tokens_per_s"]
    mesh = summary["mesh"]
    resumed = f", resumed from iteration {summary['start_iteration']}" if summary["start_iteration"] else ""
    print(f"\nLongVILA demo trained in {summary['train_seconds']:.0f}s on {world} CPU ranks (MM-SP {mesh['ulysses']}x"
          f"{mesh['ring']} mesh{resumed}): loss {losses[first]:.3f} (iteration {first}) -> {losses[last]:.3f} "
          f"(iteration {last}), {sum(tps) / len(tps):,.0f} tokens/s; checkpoint: "
          f"{summary['saved'][-1] if summary['saved'] else save}")
    ev = summary["heldout"]
    if ev:
        print(f"\nAsked about clips it never trained on ({ev['frames_per_video']} frames each), by MM-SP generation:")
        for e in ev["examples"]:
            print(f"  {os.path.relpath(e['video'])}\n    Q: {ev['question']}\n    A: {e['answer']}\n"
                  f"    truth: {e['truth']}")
        print(f"Held-out accuracy over {ev['clips']} clips: colour {ev['color']:.0%}, direction {ev['direction']:.0%}, "
              f"whole answer {ev['both']:.0%}")
    return 0


def main(argv=None):
    from megatron_longvila.errors import ArgumentError
    from megatron_longvila.training.arguments import expand_flag_files

    # Flag files (@examples/configs/...) expanded once, so the dispatch below and Megatron-LM's parser see them.
    argv = expand_flag_files(sys.argv[1:] if argv is None else argv)
    pre, _ = extra_args_provider(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)

    if pre.dry_run:
        if pre.use_megatron_training:
            raise ArgumentError("--dry-run checks launches of the project's loop: drop --use-megatron-training for it")
        if pre.world_size is None:
            raise ArgumentError("--dry-run needs --world-size N: the number of ranks the launch starts")
        from megatron_longvila.training.dry_run import dry_run, format_report

        report = dry_run(argv, extra_args_provider, world_size=pre.world_size, gpus_per_node=pre.gpus_per_node,
                         gpu=pre.gpu)
        print(json.dumps(report) if pre.json else format_report(report), flush=True)
        return 0
    given = [f for f, v in (("--world-size", pre.world_size), ("--gpus-per-node", pre.gpus_per_node),
                            ("--gpu", pre.gpu), ("--json", pre.json or None)) if v is not None]
    if given:
        raise ArgumentError(f"{', '.join(given)}: only with --dry-run")
    if pre.use_megatron_training:  # needs a Megatron-LM checkout on PYTHONPATH (docs/TRAINING.md)
        from megatron_longvila.training import megatron_lm

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

    # record: a rank's unexpected failure reaches torchrun's summary with its traceback; run_main prints an error
    # raised alike (configuration) once, from rank 0, and any other on the rank that raised it, and ends the job.
    sys.exit(record(run_main)(main))

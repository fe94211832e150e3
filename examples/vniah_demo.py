"""`make vniah`: train a tiny LongVILA on a synthetic needle task on CPU, then run V-NIAH on CPU ranks.

1. Training (one process, 1500 steps: a few minutes on 2 cores; fixed seeds and threads): each sample is a "video" of 2-16 generated grey
   haystack frames with one needle frame (a coloured square) hidden at a random place, and a question about the
   needle's colour (multiple choice, answered by a letter, or open, answered by a word), in the chat template. The
   model is a tiny LongVILA whose head dims are multiples of 8, so the same shape runs on GPU kernels: SigLIP-style
   encoder (56 px frames, 4 visual tokens each), 2x2 projector, a 2-layer Qwen2-like LLM (hidden 64, 4 query heads,
   2 KV heads). The checkpoint goes to <out>/ckpt (the project's format, with its model record).
2. V-NIAH (tools/eval_vniah.py): frame counts 4..48 (the training saw at most 16) x depths 0..100%, on 4 CPU ranks
   (a 2x2 MM-SP mesh), teacher-forced and by generation; <out>/vniah_2x2/heatmap.png. The grid runs again on one rank
   (1x1) and the predictions of the two meshes are compared wherever the 1x1 top-2 logit margin exceeds 1e-4.

    python examples/vniah_demo.py [--out longvila_vniah] [--steps 1500 | --minutes M] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TRAINED_FRAMES = 16
FRAME_COUNTS = [4, 8, 12, 16, 24, 32, 48]
DEPTHS = [0, 20, 40, 60, 80, 100]
SHAPE = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             vocab_size=256, rotary_base=10000, norm_epsilon=1e-6, qkv_bias=True, max_position_embeddings=1024)


def _samples(tokenizer, processor, rng, pool, needle_px, batch):
    """`batch` training samples (LongVILASample) of the needle task."""
    from megatron_longvila.data.conversation import MediaFrames, tokenize_conversation
    from megatron_longvila.inference import vniah
    from megatron_longvila.models.longvila import LongVILASample, Media

    colours = list(vniah.COLOURS)
    out = []
    for _ in range(batch):
        n = rng.randint(2, TRAINED_FRAMES)
        if rng.random() < 0.5:
            c = rng.choice(vniah.MC_ORDER)
            question, answer = vniah.mc_question(), chr(65 + vniah.MC_ORDER.index(c))
        else:
            c = rng.choice(colours)
            question, answer = vniah.OPEN_QUESTION, c
        at = rng.randint(0, n)
        hay = [pool[rng.randrange(len(pool))] for _ in range(n)]
        frames = torch.stack(hay[:at] + [needle_px[c]] + hay[at:])
        conv = [{"from": "human", "value": "<video>\n" + question}, {"from": "gpt", "value": answer}]
        s = tokenize_conversation(conv, [MediaFrames("video", "synthetic", list(range(n + 1)))], tokenizer, "chatml",
                                  tokens_per_frame=4)
        item = s.media[0]
        pos = torch.stack([torch.arange(o, o + 4) for o in item.frame_offsets])
        out.append(LongVILASample(input_ids=s.input_ids, labels=s.labels,
                                  media=[Media(token_positions=pos, frames=frames)]))
    return out


def train(out: str, minutes: float, steps: int, seed: int = 7) -> str:
    """Train in this process (1 rank, gloo) and save <out>/ckpt; returns its path."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.data.image_processor import SiglipImageProcessor
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.inference import vniah
    from megatron_longvila.models.longvila import MicroBatch
    from megatron_longvila.models.record import record_of
    from megatron_longvila.models.registry import ENCODERS, LLMShape, build_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime
    from megatron_longvila.checkpoint.distributed import save_checkpoint

    enable_cpu_runtime()
    torch.set_num_threads(2)  # fixed: the same thread count gives the same run
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, '.pg_init')}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    tok = load_tokenizer(None)  # bytes: "A" is one token, "purple" six, so both answer kinds are tested
    unit = 128
    vision = ENCODERS["siglip_tiny"]
    shape = LLMShape(**dict(SHAPE, vocab_size=-(-tok.vocab_size // unit) * unit))
    model = build_longvila(encoder=vision, llm=shape, media_token_id=tok.image_token_id,
                           real_vocab_size=tok.vocab_size, llm_overrides={"calculate_per_token_loss": True})
    model.record = record_of(shape, vision, real_vocab_size=tok.vocab_size,
                             tokenizer={"vocab_size": tok.vocab_size, "media_token_id": tok.image_token_id,
                                        "frame_separator_id": tok.frame_sep_token_id, "pad_id": tok.pad_id,
                                        "eos_id": tok.eos_id, "template": "chatml"},
                             registry_names={"llm": None, "vision": "siglip_tiny"})
    initialize_mmsp(model.config)
    proc = SiglipImageProcessor(vision.image_size, mode="pad")
    pool = proc(vniah.synthetic_haystack_frames(512, seed=seed + 1))
    needle_px = {c: proc(torch.from_numpy(__import__("numpy").asarray(vniah.needle_image(c))).unsqueeze(0))[0]
                 for c in vniah.COLOURS}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    mesh = single_rank_mesh()
    t0, step, ema = time.perf_counter(), 0, None
    deadline = t0 + 60 * minutes
    while (steps and step < steps) or (not steps and time.perf_counter() < deadline):
        # Warm-up, then cosine decay over the run (its length measured in steps or in time).
        done = step / steps if steps else (time.perf_counter() - t0) / (60 * minutes)
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        mb = MicroBatch.from_samples(_samples(tok, proc, rng, pool, needle_px, 8))
        loss = model(mb, mesh)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 100 == 0:
            print(f"[train] step {step} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    ckpt = os.path.join(out, "ckpt")
    save_checkpoint(ckpt, step, model, None, None, data_state=None, train_state={"recipe": "vniah_demo"})
    print(f"[train] {step} steps in {time.perf_counter() - t0:.0f}s, final loss {ema:.4f}; checkpoint {ckpt}",
          flush=True)
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="longvila_vniah", help="folder for the checkpoint and the results")
    p.add_argument("--steps", type=int, default=1500, help="training steps (fixed, so runs repeat on a machine)")
    p.add_argument("--minutes", type=float, default=None, help="train for this long instead of --steps")
    p.add_argument("--skip-train", action="store_true", help="reuse <out>/ckpt")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "ckpt")
    if not a.skip_train:
        # Training runs in a child process: the evaluation below launches its own ranks.
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=train, args=(out, a.minutes or 0.0, 0 if a.minutes else a.steps))
        proc.start()
        proc.join()
        if proc.exitcode:
            print("training failed", file=sys.stderr)
            return 1
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import eval_vniah

    common = ["--load", ckpt, "--synthetic-haystack", "--frames", *map(str, FRAME_COUNTS), "--depths",
              *map(str, DEPTHS), "--trained-frames", str(TRAINED_FRAMES), "--cache", os.path.join(out, "cache")]
    runs = {}
    for name, mesh in (("2x2", ["--cpu-ranks", "4", "--hierarchical-context-parallel-sizes", "2", "2"]),
                       ("1x1", ["--cpu-ranks", "1"])):
        t0 = time.perf_counter()
        eval_vniah.main(common + mesh + ["--out", os.path.join(out, f"vniah_{name}")])
        with open(os.path.join(out, f"vniah_{name}", "details.json")) as f:
            runs[name] = json.load(f)
        print(f"[vniah] mesh {name}: {time.perf_counter() - t0:.0f}s")
    inside = [r["Score"] for r in runs["2x2"] if r["Num. Frame"] <= TRAINED_FRAMES]
    avg_in = sum(inside) / len(inside)
    compared = differ = 0
    for a_row, b_row in zip(runs["1x1"], runs["2x2"]):
        for ref, got in zip(a_row["needles"], b_row["needles"]):
            for pos, (r_id, g_id, margin) in enumerate(zip(ref["teacher_ids"], got["teacher_ids"], ref["margins"])):
                if margin > 1e-4:
                    compared += 1
                    differ += int(r_id != g_id)
    print(f"\nV-NIAH demo: cells within the trained length ({TRAINED_FRAMES} frames) average {avg_in:.3f} "
          f"(goal >= 0.95); 2x2 vs 1x1 predictions: {compared - differ}/{compared} identical where the margin exceeds "
          f"1e-4; heatmap: {os.path.join(out, 'vniah_2x2', 'heatmap.png')}")
    return 0 if avg_in >= 0.95 and differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

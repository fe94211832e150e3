"""V-NIAH, the long-video needle-in-a-haystack evaluation, as LongVA and VILA define it, on MM-SP inference.

A haystack video is sampled to N frames; its frame embeddings (encoder + projector output) are computed once and
cached in a safetensors file, of which each rank reads only the rows of the tokens it holds. A needle image with a
question and answer is inserted as an extra frame at a depth d (`idx = d * N // 100`: N + 1 frames, the needle
added, not replacing one). A grid of frame counts x depths (0..100%) is scored

- teacher-forced (VILA's way): one forward of prompt + answer, the argmax at every answer position must equal the
  answer's tokens (token-exact, VILA v1's rule); VILA's current rule (decoded text, spaces removed, lower case) is
  recorded beside it;
- by generation: greedy decoding of len(answer) + 1 tokens through the sharded-KV decode, same text rule.

A cell's score is the mean over the needles (0, 0.2, ..., 1 for five). Outputs, in VILA's format:
`all_accuracies.json` (a list of {"Num. Frame", "Frame Depth", "Score"}), `avg_accuracy.txt` (the mean over
cells), and `heatmap.png` (rows: depth, columns: frame count; VILA's three-colour map, vmin 0, vmax 1).

Needle sets are folders a user can replace: `needles.json` ([{"image": file, "question": str, "answer": str}])
beside the images. `write_default_needles(dir)` writes the project's synthetic set (coloured squares: four
multiple-choice questions and one open, one-word answer).

    NeedleSet.load(dir)
    haystack_embeddings(model, frames, path, mesh)      compute once, cache as safetensors
    build_cell_prompt(...) -> (EmbeddingPrompt, answer ids)
    run_grid(model, tokenizer, mesh, haystack, needles, frame_counts, depths, *, template, modes) -> results
    write_outputs(out_dir, results) / plot_heatmap(path, results)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..data.conversation import MediaFrames, tokenize_conversation
from ..plan.frames import patch_grid
from ..runtime.modules import model_device, unwrap_model
from .generate import EmbeddingPrompt, generate, score

__all__ = ["Needle", "NeedleSet", "write_default_needles", "haystack_embeddings", "encode_frames_projected",
           "build_cell_prompt", "run_grid", "write_outputs", "plot_heatmap", "normalize_answer", "COLOURS",
           "synthetic_haystack_frames", "needle_image"]

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 60, 230), "yellow": (230, 210, 30),
           "purple": (150, 40, 190)}
"""The default needles' colours."""
HEATMAP_COLOURS = ["#F0496E", "#EBB839", "#9ad5b3"]
"""VILA's V-NIAH heatmap colours (0 -> 1)."""


@dataclass
class Needle:
    """One needle: an image, a question about it, the answer."""

    image: str
    """Path of the needle image."""
    question: str
    """The question (ends with the answer instruction)."""
    answer: str
    """The expected answer text."""


@dataclass
class NeedleSet:
    """Needles from a folder holding needles.json and the images it names."""

    needles: List[Needle]
    """In file order."""

    @classmethod
    def load(cls, folder: str) -> "NeedleSet":
        path = os.path.join(folder, "needles.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: a needle set is a folder with needles.json (see "
                                    f"megatron_longvila.inference.vniah.write_default_needles)")
        with open(path) as f:
            items = json.load(f)
        out = []
        for i, it in enumerate(items):
            missing = [k for k in ("image", "question", "answer") if k not in it]
            if missing:
                raise ValueError(f"{path}: needle {i} lacks {missing}")
            img = os.path.join(folder, it["image"])
            if not os.path.isfile(img):
                raise FileNotFoundError(f"{path}: needle {i}'s image {img} is missing")
            out.append(Needle(image=img, question=it["question"], answer=str(it["answer"])))
        if not out:
            raise ValueError(f"{path}: no needles")
        return cls(out)


def needle_image(colour: str, size: int = 64):
    """A grey frame with a square of `colour` (the default needles; also the demo's training needles)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    q = size // 6
    d.rectangle([q, q, size - q, size - q], fill=COLOURS[colour])
    return img


MC_ORDER = ("red", "green", "blue", "yellow")


def mc_question() -> str:
    opts = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(MC_ORDER))
    return (f"Find the frame with the coloured square. What colour is it?\n{opts}\n"
            f"Answer with the option's letter from the given choices directly.")


OPEN_QUESTION = "Find the frame with the coloured square. What colour is it? Answer with a single word."


def write_default_needles(folder: str) -> str:
    """The project's synthetic needle set: four multiple-choice needles (answers A-D) and one open one."""
    os.makedirs(folder, exist_ok=True)
    items = []
    for i, c in enumerate(MC_ORDER):
        needle_image(c).save(os.path.join(folder, f"{c}.png"))
        items.append({"image": f"{c}.png", "question": mc_question(), "answer": chr(65 + i)})
    needle_image("purple").save(os.path.join(folder, "purple.png"))
    items.append({"image": "purple.png", "question": OPEN_QUESTION, "answer": "purple"})
    with open(os.path.join(folder, "needles.json"), "w") as f:
        json.dump(items, f, indent=1)
    return folder


def synthetic_haystack_frames(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Deterministic haystack frames: grey low-frequency noise (no saturated colour), uint8 [n, size, size, 3]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g)
    tex = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08  # a slight tint: colourless to the eye
    rgb = (tex.expand(n, 3, size, size) * 0.5 + 0.25 + tint).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


def normalize_answer(text: str) -> str:
    """VILA's V-NIAH text rule: drop spaces, lower case (and the chat template's end marker)."""
    for marker in ("<|im_end|>", "</s>"):
        text = text.split(marker)[0]
    return text.replace(" ", "").replace("\n", "").lower()


# --------------------------------------------------------------------------------------------------------------
# Embeddings: computed once, cached, read by token shard
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_frames_projected(model, pixels: torch.Tensor) -> torch.Tensor:
    """Encoder + projector of preprocessed frames [n, 3, S, S] -> [n, tokens_per_frame, llm hidden] (float32)."""

    m = unwrap_model(model)
    dev = model_device(m)
    dtype = m.vision_model.conv1.weight.dtype
    out = []
    for start in range(0, pixels.shape[0], 16):
        px = pixels[start:start + 16].to(dev, dtype)
        feats = m.vision_model(px)
        rows, cols = patch_grid(px.shape[2], px.shape[3], m.vision_model.cfg.patch_size)
        out.append(m.projector(feats, rows, cols).float().cpu())
    return torch.cat(out)


def haystack_embeddings(model, frames_uint8: torch.Tensor, path: str, mesh, processor) -> str:
    """Encode the haystack frames once (each CP rank a share), write them to `path` (safetensors, key
    "embeddings" [F, T, hidden]); reuse the file when it exists with the same frame count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = int(frames_uint8.shape[0])
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            if f.get_slice("embeddings").get_shape()[0] == n:
                return path
    rank, world = mesh.cp_rank, mesh.cp_size
    mine = list(range(rank, n, world))
    emb = encode_frames_projected(model, processor(frames_uint8[mine])) if mine else None
    parts = [emb] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, emb, group=mesh.cp_group)
    if rank == 0:
        full = [None] * n
        for r, part in enumerate(parts):
            for k, f in enumerate(range(r, n, world)):
                full[f] = part[k]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"embeddings": torch.stack(full).contiguous()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    if world > 1:
        dist.barrier(group=mesh.cp_group)
    return path


class _CachedRows:
    """Rows of a cell's visual tokens, read from the haystack cache (memory-mapped, only the rows asked) and the
    needle's embedding."""

    def __init__(self, cache_path: str, frame_order: List[int], needle: torch.Tensor, tokens_per_frame: int):
        self.cache_path = cache_path
        self.order = frame_order  # per frame of the cell: a haystack frame, or -1 for the needle
        self.needle = needle
        self.t = tokens_per_frame

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        rows = rows.tolist()
        out = [None] * len(rows)
        by_frame: Dict[int, List[int]] = {}
        for i, r in enumerate(rows):
            by_frame.setdefault(r // self.t, []).append(i)
        with safe_open(self.cache_path, "pt") as f:
            sl = f.get_slice("embeddings")
            for frame, idx in by_frame.items():
                src = self.order[frame]
                emb = self.needle if src < 0 else sl[src:src + 1][0]
                for i in idx:
                    out[i] = emb[rows[i] % self.t]
        return torch.stack(out)


def build_cell_prompt(tokenizer, template: str, question: str, answer: str, *, num_frames: int, depth: int,
                      tokens_per_frame: int, frame_separator, cache_path: str, needle_embedding: torch.Tensor):
    """The prompt of one cell (N haystack frames, the needle inserted at depth %) and the answer's token ids."""

    idx = depth * num_frames // 100
    order = list(range(idx)) + [-1] + list(range(idx, num_frames))
    conv = [{"from": "human", "value": "<video>\n" + question}, {"from": "gpt", "value": answer}]
    sample = tokenize_conversation(conv, [MediaFrames("video", "haystack", list(range(len(order))))], tokenizer,
                                   template, tokens_per_frame=tokens_per_frame, frame_separator=frame_separator)
    labels = sample.labels
    learned = (labels != -100).nonzero().flatten()
    first = int(learned[0])
    answer_ids = tokenizer.encode(answer)
    if sample.input_ids[first:first + len(answer_ids)].tolist() != answer_ids:
        raise ValueError(f"the template does not start the assistant turn with the answer's tokens for {answer!r}")
    prompt_ids = sample.input_ids[:first]
    item = sample.media[0]
    positions = torch.cat([torch.arange(o, o + tokens_per_frame) for o in item.frame_offsets])
    rows = _CachedRows(cache_path, order, needle_embedding, tokens_per_frame)
    return EmbeddingPrompt(input_ids=prompt_ids, visual_positions=positions, visual_rows=rows), answer_ids


def run_grid(model, tokenizer, mesh, *, cache_path: str, needles: NeedleSet, needle_embeddings: torch.Tensor,
             frame_counts: Sequence[int], depths: Sequence[int], template: str, tokens_per_frame: int,
             frame_separator=False, modes: Sequence[str] = ("teacher", "generate"),
             progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
    """Score every (frame count, depth, needle); one row per cell with per-needle predictions."""
    cells = [(n, d) for n in frame_counts for d in depths]
    out = []
    for k, (n, d) in enumerate(cells):
        row = {"Num. Frame": int(n), "Frame Depth": int(d), "needles": []}
        for j, needle in enumerate(needles.needles):
            prompt, answer_ids = build_cell_prompt(
                tokenizer, template, needle.question, needle.answer, num_frames=n, depth=d,
                tokens_per_frame=tokens_per_frame, frame_separator=frame_separator, cache_path=cache_path,
                needle_embedding=needle_embeddings[j])
            rec = {"answer": needle.answer}
            if "teacher" in modes:
                sc = score(model, [prompt], [answer_ids], mesh)[0]
                rec["teacher_ids"] = sc.predicted
                rec["teacher_exact"] = sc.matches(answer_ids)
                rec["teacher_text"] = normalize_answer(tokenizer.decode(sc.predicted)) == normalize_answer(needle.answer)
                rec["logprobs"] = sc.logprobs
                rec["margins"] = sc.margins
            if "generate" in modes:
                new = generate(model, [prompt], mesh, max_new_tokens=len(answer_ids) + 1)[0]
                rec["generated_ids"] = new
                rec["generated_text"] = tokenizer.decode(new)
                rec["generated_ok"] = normalize_answer(tokenizer.decode(new)).startswith(normalize_answer(needle.answer))
            row["needles"].append(rec)
        key = "teacher_exact" if "teacher" in modes else "generated_ok"
        row["Score"] = sum(float(r[key]) for r in row["needles"]) / len(row["needles"])
        if "generate" in modes:
            row["Score (generation)"] = sum(float(r["generated_ok"]) for r in row["needles"]) / len(row["needles"])
        out.append(row)
        if progress is not None:
            progress(k + 1, len(cells))
    return out


def write_outputs(out_dir: str, results: List[dict], *, trained_frames: Optional[int] = None) -> dict:
    """all_accuracies.json, avg_accuracy.txt, heatmap.png (and details.json with every prediction)."""
    os.makedirs(out_dir, exist_ok=True)
    acc = [{"Num. Frame": r["Num. Frame"], "Frame Depth": r["Frame Depth"], "Score": r["Score"]} for r in results]
    with open(os.path.join(out_dir, "all_accuracies.json"), "w") as f:
        json.dump(acc, f, indent=1)
    avg = sum(r["Score"] for r in acc) / max(len(acc), 1)
    with open(os.path.join(out_dir, "avg_accuracy.txt"), "w") as f:
        f.write(f"{avg}\n")
    with open(os.path.join(out_dir, "details.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_heatmap(os.path.join(out_dir, "heatmap.png"), acc, trained_frames=trained_frames)
    return {"avg_accuracy": avg, "cells": len(acc)}


def plot_heatmap(path: str, acc: List[dict], *, trained_frames: Optional[int] = None) -> None:
    """VILA's heatmap: rows = depth (0 at the top), columns = frame count, three-colour map, vmin 0, vmax 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    frames = sorted({r["Num. Frame"] for r in acc})
    depths = sorted({r["Frame Depth"] for r in acc})
    grid = torch.full((len(depths), len(frames)), float("nan"))
    for r in acc:
        grid[depths.index(r["Frame Depth"]), frames.index(r["Num. Frame"])] = r["Score"]
    cmap = LinearSegmentedColormap.from_list("vniah", HEATMAP_COLOURS)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(frames) + 2), max(3.5, 0.6 * len(depths) + 1.5)))
    im = ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames], rotation=45)
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xticks([x - 0.5 for x in range(1, len(frames))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Num. of Frames")
    ax.set_ylabel("Depth Percent")
    if trained_frames is not None and trained_frames in frames:
        x = frames.index(trained_frames) + 0.5
        ax.axvline(x, color="black", linestyle="--", linewidth=1.5)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""V-NIAH, the long-video needle-in-a-haystack evaluation, as LongVA and VILA define it, on MM-SP inference.

A haystack video is sampled to N frames; its frame embeddings (encoder + projector output) are computed once and
cached in one safetensors file: each rank encodes a contiguous block of frames and writes its rows into the file
(no gather: a rank never holds the haystack), and each rank reads only the rows of the tokens it holds. The file
records what made it (`haystack_identity`: the model record's hash, the encoder and projector weights' hash, the
image size, mode, mean, std, and the frame sampling) and is rebuilt, with a line saying why, when any of it
differs (`cache_decision`). `haystack_memory` states its bytes per rank. A needle image with a
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
    synthetic_haystack(n) / video_haystack(path, n) -> HaystackFrames     frames read by index, their sampling
    haystack_embeddings(model, frames, path, mesh, processor)  build the cache unless it was made by the same
                                                        model, weights, preprocessing and frames
    build_cell_prompt(...) -> (EmbeddingPrompt, answer ids)
    run_grid(model, tokenizer, mesh, haystack, needles, frame_counts, depths, *, template, modes) -> results
    write_outputs(out_dir, results) / plot_heatmap(path, results)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..data.conversation import MediaFrames, tokenize_conversation
from ..data.video import decode_frames, probe_video
from ..plan.frames import patch_grid, tokens_per_frame
from ..planning.memory import ModelShape
from ..runtime.modules import model_device, unwrap_model
from .generate import EmbeddingPrompt, generate, score

__all__ = ["Needle", "NeedleSet", "write_default_needles", "haystack_embeddings", "encode_frames_projected",
           "build_cell_prompt", "run_grid", "write_outputs", "plot_heatmap", "normalize_answer", "COLOURS",
           "synthetic_haystack_frames", "needle_image", "HaystackFrames", "synthetic_haystack", "video_haystack",
           "haystack_identity", "encoder_fingerprint", "cache_decision", "frame_share", "HaystackMemory",
           "haystack_memory", "CACHE_FORMAT"]

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


def synthetic_haystack_frames(n: int, size: int = 64, seed: int = 0,
                              indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Deterministic haystack frames: grey low-frequency noise (no saturated colour), uint8 [n, size, size, 3];
    with `indices`, only those frames of the n (each frame the same as in the whole set)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g)
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08  # a slight tint: colourless to the eye
    if indices is not None:
        pick = torch.as_tensor(list(indices), dtype=torch.long)
        low, tint, n = low[pick], tint[pick], len(pick)
    tex = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
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


CACHE_FORMAT = "longvila-vniah-haystack/2"
"""The cache's layout: one safetensors tensor "embeddings" [F, T, hidden] (float32) and, in the file's metadata
under `CACHE_METADATA_KEY`, what made it (`haystack_identity`, as JSON)."""
CACHE_METADATA_KEY = "longvila_vniah"
BUILD_BATCH_FRAMES = 16
"""Frames a rank encodes and writes at a time while building the cache (its embeddings are all it holds)."""


@dataclass
class HaystackFrames:
    """A haystack's frames, read by index (each rank decodes only the frames it encodes), and what defines them."""

    count: int
    """Frames N (the largest frame count of the grid: a shorter haystack is the first frames of this one)."""
    read: Callable[[List[int]], torch.Tensor]
    """Frame indices (0 .. N-1, ascending) -> uint8 [k, H, W, 3]."""
    sampling: dict
    """What defines frame i (JSON values): the source and the sampling rule; part of the cache's identity."""


def synthetic_haystack(n: int, size: int = 64, seed: int = 0) -> HaystackFrames:
    """`synthetic_haystack_frames(n, size, seed)` read by index."""
    return HaystackFrames(n, lambda idx: synthetic_haystack_frames(n, size, seed, indices=idx),
                          {"source": "synthetic", "count": n, "size": size, "seed": seed,
                           "generator": "synthetic_haystack_frames, grey low-frequency noise v1"})


def video_haystack(path: str, n: int) -> HaystackFrames:
    """A video file sampled uniformly to n frames (frame round(i (F - 1) / (n - 1)) of its F frames), read by index.
    The sampling records the file by its real path, size and modification time, so a replaced file is noticed."""
    info = probe_video(path)
    idx = torch.linspace(0, info.num_frames - 1, n).round().long().tolist()
    st = os.stat(path)
    sampling = {"source": "video", "path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                "video_frames": info.num_frames, "count": n, "rule": "uniform: round(linspace(0, frames - 1, N))",
                "indices_sha256": _sha256_text(json.dumps(idx))}
    return HaystackFrames(n, lambda sel: decode_frames(path, [idx[i] for i in sel], info=info), sampling)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tp() -> tuple:
    """(TP rank, TP size, TP group) of Megatron's parallel state; (0, 1, None) when it is not initialized."""
    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def encoder_fingerprint(model) -> str:
    """sha256 of the tensors that make the embeddings (the encoder's and the projector's: names, dtypes, shapes,
    bytes) as this rank's TP shard holds them, combined over the TP group in rank order (a tensor all-gather of 32
    bytes). Equal exactly when those weights are equal, at the same TP size."""
    m = unwrap_model(model)
    h = hashlib.sha256()
    for part in ("vision_model", "projector"):
        for name, t in sorted(getattr(m, part).state_dict().items()):
            if not isinstance(t, torch.Tensor):  # Transformer Engine's _extra_state: fp8 metadata, not a weight
                continue
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    _, tp, group = _tp()
    if tp == 1:
        return h.hexdigest()
    mine = torch.tensor(list(h.digest()), dtype=torch.uint8, device=model_device(m))
    parts = [torch.empty_like(mine) for _ in range(tp)]
    dist.all_gather(parts, mine, group=group)
    return hashlib.sha256(b"".join(bytes(p.cpu().tolist()) for p in parts)).hexdigest()


def haystack_identity(model, processor, frames: HaystackFrames) -> dict:
    """What makes the cached embeddings: the model record, the encoder and projector weights (at this TP size), the
    image preprocessing and the frame sampling. A cache is reused only when its recorded identity equals this."""
    m = unwrap_model(model)
    record = getattr(m, "record", None)
    if record is None:
        raise ValueError("V-NIAH's haystack cache records the model's record, and this model carries none: load the "
                         "model with conversion.load_longvila (or attach models.record.record_of(...) as .record)")
    return {"format": CACHE_FORMAT,
            "model_record_sha256": _sha256_text(record.to_json()),
            "encoder_weights_sha256": encoder_fingerprint(m),
            "tensor_parallel_size": _tp()[1],
            "image": {"size": int(processor.size), "mode": processor.mode, "mean": list(processor.mean),
                      "std": list(processor.std), "backend": processor.backend},
            "frames": dict(frames.sampling)}


_WHAT = {"format": "cache format", "model_record_sha256": "model record",
         "encoder_weights_sha256": "encoder and projector weights",
         "tensor_parallel_size": "tensor-parallel size (the weights are fingerprinted per TP shard)",
         "image": "image preprocessing", "frames": "frame sampling"}


def _short(v) -> str:
    text = json.dumps(v)
    return text[:13] + "...\"" if isinstance(v, str) and len(v) == 64 else text  # hashes: their first 12 digits


def _differences(stored: dict, wanted: dict) -> List[str]:
    out = []
    for k in list(wanted) + [k for k in stored if k not in wanted]:
        a, b = stored.get(k), wanted.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [f"{s} {_short(a.get(s))} -> {_short(b.get(s))}" for s in sorted(set(a) | set(b))
                   if a.get(s) != b.get(s)]
            out.append(f"{_WHAT.get(k, k)} ({', '.join(sub)})")
        else:
            out.append(f"{_WHAT.get(k, k)} ({_short(a)} -> {_short(b)})")
    return out


def cache_decision(path: str, wanted: dict, shape: Sequence[int]) -> tuple:
    """(reuse, line): whether the cache at `path` was made by `wanted` with embeddings of `shape` [F, T, hidden],
    and the line that says so, or why it is (re)built."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return False, f"no haystack cache at {path}: building it"
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            stored_shape = list(f.get_slice("embeddings").get_shape())
        stored = json.loads(meta[CACHE_METADATA_KEY]) if CACHE_METADATA_KEY in meta else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt, and the line says why
        return False, f"haystack cache {path} cannot be read ({type(e).__name__}: {e}): rebuilding it"
    if not isinstance(stored, dict):
        return False, (f"haystack cache {path} does not record what made it (an older cache, or not V-NIAH's): "
                       f"rebuilding it")
    diffs = _differences(stored, wanted)
    if diffs:
        return False, f"haystack cache {path} was made with another {'; another '.join(diffs)}: rebuilding it"
    if stored_shape != list(shape):
        return False, (f"haystack cache {path} holds embeddings {stored_shape}, this model makes {list(shape)}: "
                       f"rebuilding it")
    return True, f"reusing haystack cache {path} (same model record, weights, preprocessing and frames)"


def frame_share(n: int, worker: int, workers: int) -> range:
    """The haystack frames worker `worker` of `workers` encodes: a contiguous block (one sequential write)."""
    return range(worker * n // workers, (worker + 1) * n // workers)


def _workers(mesh) -> tuple:
    """(this rank's worker index, workers, whether it writes): one worker per (data-parallel replica, CP rank); the
    TP ranks of a worker encode together (the encoder is TP-sharded), and TP rank 0 writes."""
    dp, dps = ((ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
               if ps.model_parallel_is_initialized() else (0, 1))
    return dp * mesh.cp_size + mesh.cp_rank, dps * mesh.cp_size, _tp()[0] == 0


def _safetensors_header(shape: Sequence[int], identity: dict) -> bytes:
    """The safetensors prefix of one float32 tensor "embeddings" of `shape` (8-byte length, JSON header padded with
    spaces to 8 bytes, as safetensors writes it)."""
    nbytes = 4 * math.prod(shape)
    header = {"__metadata__": {CACHE_METADATA_KEY: json.dumps(identity, sort_keys=True)},
              "embeddings": {"dtype": "F32", "shape": [int(s) for s in shape], "data_offsets": [0, nbytes]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _world_barrier(device) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def haystack_embeddings(model, frames: HaystackFrames, path: str, mesh, processor, *,
                        batch_frames: int = BUILD_BATCH_FRAMES, say: Callable[[str], None] = print) -> str:
    """The haystack's embeddings [F, T, hidden] cached at `path` (safetensors), built only when the file there was
    not made by this model record, encoder weights, preprocessing and frame sampling (`haystack_identity`).

    Every rank of the job calls it. Rank 0 decides and says so in one line (`say`); the decision is broadcast.
    A build: rank 0 writes the header of `path`.partial and sizes the file; every worker (one per data-parallel
    replica and CP rank, `frame_share`) decodes, encodes and writes its own block of frames `batch_frames` at a time
    straight into its rows of the file (no gather: a rank holds one batch of embeddings, never the haystack);
    rank 0 renames the file into place once every worker has written. `path` must be on a file system every rank
    sees (as it must be for the readers, `_CachedRows`)."""
    m = unwrap_model(model)
    device = model_device(m)
    wanted = haystack_identity(m, processor, frames)
    n = frames.count
    shape = [n, tokens_per_frame(processor.size, processor.size, m.vision_model.cfg.patch_size),
             int(m.language_model.model.config.hidden_size)]
    rank = dist.get_rank() if dist.is_initialized() else 0
    header = _safetensors_header(shape, wanted)
    # Rank 0's decision and header length for every rank: the identity holds paths and times another node may
    # see differently, and rows must land where rank 0's header says they start.
    decided = torch.zeros(2, dtype=torch.int64, device=device)
    if rank == 0:
        reuse, line = cache_decision(path, wanted, shape)
        say(f"[vniah] {line}")
        decided[0], decided[1] = int(reuse), len(header)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(decided, src=0)
    reuse, data_start = (int(v) for v in decided.tolist())
    if reuse:
        return path
    partial = path + ".partial"
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(partial, "wb") as f:
            f.write(header)
            f.truncate(len(header) + 4 * math.prod(shape))
    _world_barrier(device)
    worker, workers, writes = _workers(mesh)
    mine = list(frame_share(n, worker, workers))
    row_bytes = 4 * shape[1] * shape[2]
    with open(partial, "r+b") if writes and mine else contextlib.nullcontext() as f:
        for start in range(0, len(mine), batch_frames):
            idx = mine[start:start + batch_frames]
            emb = encode_frames_projected(m, processor(frames.read(idx))).contiguous()
            if list(emb.shape) != [len(idx)] + shape[1:]:
                raise ValueError(f"the encoder made embeddings {list(emb.shape)} for {len(idx)} haystack frames; the "
                                 f"cache expects [{len(idx)}, {shape[1]}, {shape[2]}] (tokens per frame at "
                                 f"{processor.size} px, the LLM's width)")
            if f is not None:
                f.seek(data_start + idx[0] * row_bytes)
                f.write(emb.numpy().data)
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    _world_barrier(device)
    if rank == 0:
        os.replace(partial, path)
    _world_barrier(device)
    return path


class _CachedRows:
    """Rows of a cell's visual tokens, read from the haystack cache (memory-mapped, only the frames asked) and the
    needle's embedding."""

    def __init__(self, cache_path: str, frame_order: List[int], needle: torch.Tensor, tokens_per_frame: int):
        self.cache_path = cache_path
        self.order = frame_order  # per frame of the cell: a haystack frame, or -1 for the needle
        self.needle = needle
        self.t = tokens_per_frame

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        rows = rows.to("cpu", torch.long)
        frame, within = rows // self.t, rows % self.t
        out = torch.empty((rows.numel(), self.needle.shape[-1]), dtype=torch.float32)
        with safe_open(self.cache_path, "pt") as f:
            sl = f.get_slice("embeddings")
            for fr in torch.unique(frame).tolist():
                at = (frame == fr).nonzero().flatten()
                src = self.order[fr]
                emb = self.needle.float() if src < 0 else sl[src:src + 1][0]
                out[at] = emb[within[at]]
        return out


@dataclass(frozen=True)
class HaystackMemory:
    """Bytes of a V-NIAH haystack per place they live (`haystack_memory`)."""

    visual_tokens: int
    """Haystack tokens: frames x tokens per frame."""
    cache_file: int
    """The cache file: every frame's embeddings in float32 (on disk; readers memory-map only their rows)."""
    build_per_rank: int
    """Embeddings a rank holds while building the cache: one batch of `batch_frames` frames."""
    rows_per_rank: int
    """Visual rows a rank reads for a cell: its 1/CP share of the haystack's tokens, float32."""
    kv_per_rank: int
    """Its KV cache of those tokens after prefill: every layer's K and V of its TP rank's KV heads."""
    gathered_per_rank: int
    """What a gather of the whole haystack to every rank would hold there (the former pickled all-gather: the whole
    file, before pickling's copies)."""


def haystack_memory(shape: ModelShape, frames: int, tokens_per_frame: int, cp: int, *, tp: int = 1,
                    kv_bytes: int = 2, batch_frames: int = BUILD_BATCH_FRAMES) -> HaystackMemory:
    """The haystack's bytes per rank for an LLM of `shape` on a CP group of `cp` ranks (TP `tp`, KV in elements of
    `kv_bytes`): the terms the V-NIAH cache adds to the memory model's per-rank figures."""
    tokens = frames * tokens_per_frame
    local = -(-tokens // cp)
    row = 4 * shape.hidden
    kv_heads = max(1, shape.kv_heads // tp)  # fewer KV heads than TP ranks: each rank holds one (replicated)
    return HaystackMemory(visual_tokens=tokens, cache_file=tokens * row,
                          build_per_rank=batch_frames * tokens_per_frame * row, rows_per_rank=local * row,
                          kv_per_rank=local * shape.layers * 2 * kv_heads * shape.head_dim * kv_bytes,
                          gathered_per_rank=tokens * row)


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

"""V-NIAH's haystack cache: what made it decides whether it is reused; every rank writes only its own rows.

In one process (no model): the identity rule of `cache_decision` (reused only when the model record, the encoder and
projector weights, the TP size, the image preprocessing and the frame sampling all match, and the embeddings' shape;
rebuilt with a line naming what differs, for an older cache without a record of what made it, an unreadable one, or
none); the header the ranks write into is a safetensors file safetensors reads; synthetic frames read by index equal
the whole set's, a video's frames read by index equal its decoded frames and a touched file changes the sampling;
the memory figures of `haystack_memory` against hand arithmetic.

On 2 gloo ranks: a cache built by one checkpoint's weights (CP 2, each rank writing its block in batches of 2 frames)
equals the single-process encoding (1e-5 relative); offered again to the same weights it is reused untouched;
offered to another checkpoint's weights (same record) it is rebuilt with a line saying so, and then holds the new
weights' embeddings; at TP 2 it is rebuilt again (the weights are fingerprinted per TP shard) and the file's rows
equal that model's.
"""

import json
import os

import torch

from megatron_longvila.inference import vniah
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.planning.memory import ModelShape

RTOL = 1e-5


def _identity(**changes):
    ident = {"format": vniah.CACHE_FORMAT, "model_record_sha256": "a" * 64, "encoder_weights_sha256": "b" * 64,
             "tensor_parallel_size": 1,
             "image": {"size": 56, "mode": "pad", "mean": [0.5] * 3, "std": [0.5] * 3, "backend": "pil"},
             "frames": {"source": "synthetic", "count": 3, "size": 64, "seed": 0, "generator": "g"}}
    for k, v in changes.items():
        ident[k] = dict(ident[k], **v) if isinstance(v, dict) else v
    return ident


def _write(path, shape, ident, data):
    header = vniah._safetensors_header(shape, ident)
    with open(path, "wb") as f:
        f.write(header)
        f.write(data.contiguous().numpy().tobytes())


def test_cache_identity_rule(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "haystack.safetensors")
    shape = [3, 4, 8]
    data = torch.arange(96, dtype=torch.float32).reshape(shape)
    reuse, line = vniah.cache_decision(path, _identity(), shape)
    assert not reuse and line.startswith("no haystack cache at")

    _write(path, shape, _identity(), data)
    with safe_open(path, "pt") as f:  # the header the ranks write into is safetensors'
        assert torch.equal(f.get_tensor("embeddings"), data)
        assert json.loads(f.metadata()[vniah.CACHE_METADATA_KEY]) == _identity()
    assert vniah.cache_decision(path, _identity(), shape) == (
        True, f"reusing haystack cache {path} (same model record, weights, preprocessing and frames)")

    cases = {  # what differs -> the words the line must hold
        "another checkpoint": (_identity(encoder_weights_sha256="c" * 64), "another encoder and projector weights"),
        "another record": (_identity(model_record_sha256="d" * 64), "another model record"),
        "image mode": (_identity(image={"mode": "resize"}), 'image preprocessing (mode "pad" -> "resize")'),
        "image size": (_identity(image={"size": 64}), "image preprocessing (size 56 -> 64)"),
        "frame sampling": (_identity(frames={"seed": 1}), "frame sampling (seed 0 -> 1)"),
        "TP size": (_identity(tensor_parallel_size=2), "tensor-parallel size"),
    }
    for name, (wanted, words) in cases.items():
        reuse, line = vniah.cache_decision(path, wanted, shape)
        assert not reuse and words in line and line.endswith("rebuilding it"), (name, line)
    reuse, line = vniah.cache_decision(path, _identity(), [3, 4, 16])
    assert not reuse and "holds embeddings [3, 4, 8], this model makes [3, 4, 16]" in line

    save_file({"embeddings": data}, path)  # an older cache: no record of what made it
    reuse, line = vniah.cache_decision(path, _identity(), shape)
    assert not reuse and "does not record what made it" in line
    with open(path, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    reuse, line = vniah.cache_decision(path, _identity(), shape)
    assert not reuse and "cannot be read" in line


def test_synthetic_frames_by_index_and_shares():
    whole = vniah.synthetic_haystack_frames(9, size=32, seed=5)
    assert torch.equal(vniah.synthetic_haystack_frames(9, size=32, seed=5, indices=[2, 3, 7]), whole[[2, 3, 7]])
    hs = vniah.synthetic_haystack(9, size=32, seed=5)
    assert torch.equal(hs.read([8]), whole[[8]]) and hs.sampling["seed"] == 5
    for workers in (1, 2, 4, 16):  # the workers' blocks cover every frame once, in order
        assert [f for w in range(workers) for f in vniah.frame_share(9, w, workers)] == list(range(9))


def test_video_haystack_reads_by_index_and_records_the_file(tmp_path):
    from megatron_longvila.data.video import decode_frames
    from tests.data.media import make_testsrc_video

    video = make_testsrc_video(str(tmp_path / "clip.mp4"), "h264", seconds=1)  # 24 frames
    hs = vniah.video_haystack(video, 5)
    assert hs.sampling["video_frames"] == 24 and hs.count == 5
    assert torch.equal(hs.read([1, 3]), decode_frames(video, [6, 17]))  # round(linspace(0, 23, 5)) = 0 6 12 17 23
    os.utime(video, ns=(1, 1))  # the same path, another file as far as the cache can tell
    stored = dict(_identity(), frames=hs.sampling)
    wanted = dict(_identity(), frames=vniah.video_haystack(video, 5).sampling)
    assert vniah._differences(stored, wanted) == [f"frame sampling (mtime_ns {hs.sampling['mtime_ns']} -> 1)"]


def test_haystack_memory_at_the_papers_scale():
    shape = ModelShape.from_names("qwen2_7b", "siglip_so400m_patch14_384")
    mem = vniah.haystack_memory(shape, 6000, 196, 32)
    tokens = 6000 * 196
    assert mem.visual_tokens == tokens == 1_176_000
    assert mem.cache_file == mem.gathered_per_rank == tokens * 3584 * 4  # 16.9 GB: what every rank used to receive
    assert mem.rows_per_rank == 36_750 * 3584 * 4  # 527 MB
    assert mem.build_per_rank == 16 * 196 * 3584 * 4  # 45 MB
    assert mem.kv_per_rank == 36_750 * 28 * 2 * 4 * 128 * 2  # 28 layers, K and V, 4 KV heads of 128, bf16: 2.1 GB
    assert vniah.haystack_memory(shape, 6000, 196, 32, tp=8).kv_per_rank == 36_750 * 28 * 2 * 1 * 128 * 2


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _cache_ranks(rank, world, folder):
    import torch.distributed as dist
    from safetensors import safe_open

    from megatron_longvila.data.image_processor import SiglipImageProcessor
    from megatron_longvila.models.record import record_of
    from megatron_longvila.models.registry import ENCODERS, LLMS
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from tests.models._longvila_cases import build, setup_megatron

    path = os.path.join(folder, "haystack.safetensors")
    frames = vniah.synthetic_haystack(7, size=64)  # 7 frames: blocks of 3 and 4 frames on 2 CP ranks
    proc = SiglipImageProcessor(56)
    lines = []

    def model(tp, cp, seed):
        setup_megatron(tp=tp, cp=cp, hier=[cp, 1] if cp > 1 else None, seed=seed)
        m = build(tp=tp, cp=cp, hier=[cp, 1] if cp > 1 else None)
        m.record = record_of(LLMS["tiny"], ENCODERS["siglip_tiny"], real_vocab_size=LLMS["tiny"].vocab_size)
        return m.eval(), build_mmsp_mesh(cp, 1)

    def cached():
        with safe_open(path, "pt") as f:
            return f.get_tensor("embeddings")

    def own(m):  # the model's embeddings of every frame, in one process
        return vniah.encode_frames_projected(m, proc(frames.read(list(range(frames.count)))))

    out = {}
    a, mesh = model(1, 2, seed=3)
    vniah.haystack_embeddings(a, frames, path, mesh, proc, batch_frames=2, say=lines.append)
    ref_a = own(a)
    out["a"] = _rel(cached(), ref_a)
    before = os.stat(path)
    dist.barrier()
    vniah.haystack_embeddings(a, frames, path, mesh, proc, batch_frames=2, say=lines.append)
    after = os.stat(path)
    out["untouched"] = (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    dist.barrier()

    b, mesh = model(1, 2, seed=4)  # another checkpoint: the same record, other weights
    vniah.haystack_embeddings(b, frames, path, mesh, proc, batch_frames=2, say=lines.append)
    out["b"] = _rel(cached(), own(b))
    out["b_vs_a"] = _rel(cached(), ref_a)

    c, mesh = model(2, 1, seed=4)
    vniah.haystack_embeddings(c, frames, path, mesh, proc, say=lines.append)
    out["tp2"] = _rel(cached(), own(c))
    out["partial_left"] = os.path.exists(path + ".partial")
    out["lines"] = lines
    return out


def test_cache_made_by_one_checkpoint_and_offered_to_another_is_rebuilt(tmp_path):
    res = run_distributed(_cache_ranks, 2, str(tmp_path), timeout=240)
    path = str(tmp_path / "haystack.safetensors")
    r0 = res[0]
    assert r0["lines"][0] == f"[vniah] no haystack cache at {path}: building it"
    assert r0["lines"][1].startswith(f"[vniah] reusing haystack cache {path}")
    assert "another encoder and projector weights" in r0["lines"][2] and "model record" not in r0["lines"][2]
    assert r0["lines"][2].endswith("rebuilding it")
    assert "another tensor-parallel size" in r0["lines"][3] and len(r0["lines"]) == 4
    assert res[1]["lines"] == []  # the line comes once, from rank 0
    for r in res:
        assert r["a"] < RTOL and r["b"] < RTOL and r["tp2"] < RTOL, r
        assert r["untouched"] and not r["partial_left"]
        assert r["b_vs_a"] > 1e-2  # the rebuilt cache holds the new weights' embeddings, not the old ones

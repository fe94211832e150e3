"""The memory benchmark: measured bytes of real LongVILA steps on CPU ranks next to planning.memory's prediction.

    BENCH_SHAPES, BENCH_SETTINGS, BENCH_MESHES    the matrix tools/bench_memory.py runs
    run_matrix(shapes, settings, meshes, world_cap=8) -> list of rows     (one launch per mesh)
    bench_rank(rank, world, ...)                  one rank's measurements (run by megatron_longvila.parallel.launch)

Each case runs Megatron's schedule (DDP, 1F1B under PP, fp32, gloo) over MICRO micro-batches of one synthetic
packed sequence with video frames, and measures on every rank, independently of the model:
- saved: distinct bytes autograd saves for the backward in one micro-batch's forward (planning.measure's
  SavedTensorMeter), split into the LLM's transformer block, the encoder's block and the rest;
- peak: the most tensor storage allocated during the step's forward and backward alive at once (a dispatch mode);
- offloaded: the bytes activation offload moved to host memory per micro-batch (its own counters);
- RSS beside them.
The prediction is planning.memory's for the same shapes and this rank's actual work (its tokens, its frames).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..batch.gpt import loss_func
from ..batch.microbatch import plan_microbatch
from ..batch.sample import IGNORE_INDEX, LongVILASample, Media, MicroBatch
from ..models.offload import ActivationMemoryConfig, RecomputeConfig, offloads_of
from ..models.registry import LLMShape, build_longvila
from ..models.vision import VisionConfig
from ..parallel.launch import run_distributed
from ..parallel.mesh import build_mmsp_mesh
from ..plan.frames import tokens_per_frame
from ..runtime.cpu import enable_cpu_runtime
from ..runtime.modules import model_device
from . import memory as mm
from .measure import LiveTensorTracker, SavedTensorMeter, max_rss_bytes, rss_bytes

MICRO = 2
"""Micro-batches per step (1F1B at PP=2 then holds two micro-batches on the first stage)."""


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """One model shape and its micro-batch for the benchmark."""

    name: str
    """Label in the tables."""
    llm: dict
    """LLMShape fields."""
    vision: dict
    """VisionConfig fields."""
    seq_length: int
    """Tokens per micro-batch (filled to this length)."""
    frames: int
    """Video frames per micro-batch."""
    text: int
    """Text tokens of the video sample's answer (a text-only sample fills the rest)."""


BENCH_SHAPES = {
    "tiny": BenchShape(name="tiny", llm=dict(hidden_size=48, num_layers=4, num_attention_heads=4, num_query_groups=2,
                                             ffn_hidden_size=64, vocab_size=96, rotary_base=10000, norm_epsilon=1e-6,
                                             qkv_bias=True, max_position_embeddings=512),
                       vision=dict(image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_attention_heads=4,
                                   ffn_hidden_size=64),
                       seq_length=160, frames=8, text=40),
    "small": BenchShape(name="small", llm=dict(hidden_size=128, num_layers=4, num_attention_heads=8,
                                               num_query_groups=4, ffn_hidden_size=320, vocab_size=1024,
                                               rotary_base=10000, norm_epsilon=1e-6, qkv_bias=True,
                                               max_position_embeddings=1024),
                        vision=dict(image_size=112, patch_size=14, hidden_size=64, num_layers=2,
                                    num_attention_heads=4, ffn_hidden_size=160),
                        seq_length=512, frames=16, text=120),
}


def _full(method: str, n: int) -> ActivationMemoryConfig:
    return ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method=method, num_layers=n),
                                  vision=RecomputeConfig(granularity="full", method=method, num_layers=n,
                                                         flag_prefix="--vision-recompute"))


BENCH_SETTINGS = {
    "none": ActivationMemoryConfig(),
    "selective": ActivationMemoryConfig(llm=RecomputeConfig(granularity="selective"),
                                        vision=RecomputeConfig(granularity="selective",
                                                               flag_prefix="--vision-recompute")),
    "full_uniform_1": _full("uniform", 1),
    "full_block_1": _full("block", 1),
    "offload": ActivationMemoryConfig(offload=True),
    "offload_full": dataclasses.replace(_full("uniform", 1), offload=True),
}

BENCH_MESHES = {"1x1": (1, 1, 1, 1), "2x2": (1, 1, 2, 2), "2x2_pp2": (1, 2, 2, 2)}
"""(TP, PP, U, R) of each mesh; DP is 1."""


def synthetic_microbatch(shape: BenchShape, seed: int):
    """A packed sequence: a video sample (frames, a prompt, an answer) and a text-only sample after it."""
    g = torch.Generator().manual_seed(seed)
    v = shape.vision
    tpf = tokens_per_frame(v["image_size"], v["image_size"], v["patch_size"])
    vocab = shape.llm["vocab_size"]
    media_id, sep = 5, 7
    ids = torch.randint(10, vocab, (4,), generator=g).tolist()
    pos = []
    for _ in range(shape.frames):
        pos.append(list(range(len(ids), len(ids) + tpf)))
        ids += [media_id] * tpf + [sep]
    prompt = len(ids)
    ids += torch.randint(10, vocab, (shape.text,), generator=g).tolist()
    ids_t = torch.tensor(ids)
    labels = ids_t.clone()
    labels[:prompt] = IGNORE_INDEX
    px = torch.randn(shape.frames, 3, v["image_size"], v["image_size"], generator=g)
    video = LongVILASample(input_ids=ids_t, labels=labels, media=[Media(token_positions=torch.tensor(pos), frames=px)])
    rest = shape.seq_length - len(ids) - shape.seq_length // 8  # leave room: the filler pads to seq_length
    text = torch.randint(10, vocab, (max(rest, 8),), generator=g)
    return MicroBatch.from_samples([video, LongVILASample(input_ids=text, labels=text.clone())])


def _meter_blocks(model, meters: Dict[str, object], active: List[bool]):
    """Separate saved-tensor meters around the LLM's and the encoder's transformer blocks (breakdown only)."""
    params = list(model.parameters()) + list(model.buffers())
    blocks = {"llm": model.language_model.model.decoder}
    if model.vision_model is not None:
        blocks["vision"] = model.vision_model.decoder
    for name, block in blocks.items():
        meters[name] = SavedTensorMeter(exclude=params)

        def pre(mod, args, kwargs, name=name):
            if active[0]:
                meters[name].__enter__()

        def post(mod, args, kwargs, out, name=name):
            if active[0]:
                meters[name].__exit__(None, None, None)

        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post, with_kwargs=True)


def bench_rank(rank, world, mesh: Tuple[int, int, int, int], cases: Sequence[Tuple[str, str]]):
    """Measure every (shape, setting) case on this rank's part of `mesh`; returns one dict per case."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, pp, u, r = mesh
    enable_cpu_runtime()
    cp = u * r
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, hierarchical_context_parallel_sizes=[u, r])
    mmsp = build_mmsp_mesh(u, r)
    rows = []
    for shape_name, setting_name in cases:
        shape, setting = BENCH_SHAPES[shape_name], BENCH_SETTINGS[setting_name]
        torch.manual_seed(1)
        model_parallel_cuda_manual_seed(1)
        model = build_longvila(encoder=VisionConfig(**shape.vision), llm=LLMShape(**shape.llm),
                               tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               context_parallel_size=cp, hierarchical_context_parallel_sizes=[u, r],
                               media_token_id=5, activation_memory=setting,
                               llm_overrides=dict(calculate_per_token_loss=True, batch_p2p_comm=False))
        cfg = model.config
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = ddp.no_sync
        batches = [synthetic_microbatch(shape, seed=10 + m) for m in range(MICRO)]
        planned = [plan_microbatch(model.visual_spec, b, mmsp, seq_length=shape.seq_length).to(model_device(model))
                   for b in batches]
        meters: Dict[str, object] = {}
        active = [False]
        _meter_blocks(model, meters, active)
        params = list(model.parameters()) + list(model.buffers())
        rest = SavedTensorMeter(exclude=params)
        count = [0]

        def step(it, model):
            mb = next(it)
            first = count[0] == 0
            count[0] += 1
            active[0] = first
            if first:
                rest.__enter__()
            try:
                res = model(mb, reduction="none")
            finally:
                if first:
                    rest.__exit__(None, None, None)
                    first_forward.update(offloaded=sum(o.stats.bytes_offloaded for o in offs.values()),
                                         kept=sum(o.stats.bytes_kept for o in offs.values()))
                active[0] = False
            if isinstance(res, tuple):
                ce, w = res
                return ce, partial(loss_func, w)
            return res, partial(loss_func, None)

        first_forward = {"offloaded": 0, "kept": 0}
        offs = offloads_of(model)
        for o in offs.values():
            o.stats.reset()
        ddp.zero_grad_buffer()
        rss0 = rss_bytes()
        tracker = LiveTensorTracker()
        t0 = time.perf_counter()
        with tracker:
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter(planned), model=[ddp],
                                        num_microbatches=MICRO, seq_length=shape.seq_length, micro_batch_size=1)
        seconds = time.perf_counter() - t0
        leftover = tracker.finish()
        work = mm.rank_work_of(planned[0], model)
        pred = mm.predict_rank_memory(mm.ModelShape.of(model), mm.Layout(tp=tp, pp=pp, ulysses=u, ring=r, dp=1),
                                      work, setting, micro_batches=MICRO, stage=ps.get_pipeline_model_parallel_rank(),
                                      element_bytes=4)
        saved = {k: m.bytes for k, m in meters.items()}
        saved["rest"] = rest.bytes
        saved["offload_kept"] = first_forward["kept"]  # saved inside offloaded blocks but left on the device
        rows.append(dict(
            shape=shape_name, setting=setting_name, mesh=mesh, rank=rank, stage=ps.get_pipeline_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(), tokens=planned[0].plan.local_len,
            frames=len(planned[0].frames_encoded) if ps.is_pipeline_first_stage() else 0,
            measured={"saved": sum(saved.values()), "saved_parts": saved, "peak": tracker.peak,
                      "peak_at": f"{tracker.peak_phase}:{tracker.peak_op}", "leftover": leftover,
                      "offloaded": first_forward["offloaded"],
                      "rss": rss_bytes(), "rss_delta": rss_bytes() - rss0, "max_rss": max_rss_bytes()},
            predicted={"saved": pred.saved_bytes, "saved_parts": pred.saved_parts, "peak": pred.peak_bytes,
                       "peak_at": pred.peak_at, "timeline": pred.timeline, "work": dataclasses.asdict(work),
                       "offloaded": pred.offloaded_bytes},
            seconds=seconds))
        del ddp, model, planned
    ps.destroy_model_parallel()
    return rows


def run_matrix(shapes: Sequence[str] = tuple(BENCH_SHAPES), settings: Sequence[str] = tuple(BENCH_SETTINGS),
               meshes: Sequence[str] = tuple(BENCH_MESHES), timeout: float = 600.0) -> List[dict]:
    """Every case, one launch of CPU ranks per mesh; rows from every rank."""
    out = []
    cases = [(s, t) for s in shapes for t in settings]
    for mesh_name in meshes:
        mesh = BENCH_MESHES[mesh_name]
        world = mesh[0] * mesh[1] * mesh[2] * mesh[3]
        for rank_rows in run_distributed(bench_rank, world, mesh, cases, timeout=timeout):
            for row in rank_rows:
                row["mesh_name"] = mesh_name
                out.append(row)
    return out


def relative_error(row: dict, key: str) -> Optional[float]:
    """(predicted - measured) / measured for one figure of a row (None when nothing was measured)."""
    m, p = row["measured"][key], row["predicted"][key]
    if not m:
        return None if not p else float("inf")
    return (p - m) / m

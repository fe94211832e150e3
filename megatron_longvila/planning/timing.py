"""The time model: seconds per training step of a layout, from kernel throughput and counted communication bytes.

    GpuProfile, PROFILES          stated figures per GPU kind (h100, h200, gb200) and how to override them
    load_kernel_figures(path)     measured throughput (tools/gpu_memory_check.py --json writes "kernel_figures")
    comm_bytes(...)               bytes one rank sends per micro-batch, per kind (Ulysses, ring, TP, PP, stage 2, DP)
    step_time(...) -> StepTime    seconds per step with its breakdown

Communication bytes are the project's own counts: MM-SP attention's per-rank minimum of attention/cost.py (every
(token, head) crosses a Ulysses group once per direction; KV makes R-1 hops forward and again backward; the dK/dV
accumulators R-1 hops in fp32), which the attention benchmark measures equal to the bytes comm.py counts; stage 2's
rows (each visual row at most once, both directions); Megatron's TP collectives; the gradient all-reduce over
DP x CP. Compute is dense FLOPs (6 per parameter per token, 8 with full recompute) plus causal attention FLOPs,
divided by the profile's achieved throughput; the ring's KV exchange overlaps its attention (MM-SP posts the next
block before computing the current one), the other collectives do not. Offload's host copies run on the compute
stream (no overlap) at the host link's bandwidth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from ..models.offload import ActivationMemoryConfig
from ..plan.ulysses import head_layout
from .memory import Layout, ModelShape, RankWork, _heads_per_tp, even_rank_work, static_memory


@dataclass(frozen=True)
class GpuProfile:
    """What one GPU kind computes and moves per second (stated figures unless measured)."""

    name: str
    """Profile name."""
    memory_gb: float
    """Device memory (GiB usable)."""
    bf16_tflops: float
    """Dense bf16 peak (TFLOP/s)."""
    gemm_efficiency: float = 0.6
    """Fraction of the peak that large transformer GEMMs reach (stated; replaced by a measured figure)."""
    attention_efficiency: float = 0.45
    """Fraction of the peak flash attention forward+backward reaches (stated; replaced by a measured figure)."""
    nvlink_gbps: float = 450.0
    """Per-GPU NVLink bandwidth one way (GB/s) inside a domain."""
    network_gbps: float = 50.0
    """Per-GPU network bandwidth one way (GB/s) between domains (400 Gb/s InfiniBand = 50 GB/s)."""
    host_gbps: float = 50.0
    """Host link one way (GB/s): PCIe Gen5 on H100/H200, NVLink-C2C on GB200 (for offload)."""
    domain: int = 8
    """GPUs per NVLink domain by default."""
    step_latency_s: float = 25e-6
    """Fixed cost of one ring step (a kernel launch, a point-to-point round and the merge) or one collective call,
    whatever its size (stated: NCCL's small-message latency and launch overheads are tens of microseconds)."""
    source: str = "stated"
    """Where the throughput figures come from ("stated" or the measurement file)."""


PROFILES: Dict[str, GpuProfile] = {
    # H100 SXM: 989 TFLOP/s dense bf16, 80 GB HBM3 (81,559 MiB visible to CUDA), NVLink 4 900 GB/s both ways, one
    # 400 Gb/s NIC per GPU, PCIe Gen5.
    "h100": GpuProfile(name="h100", memory_gb=79.6, bf16_tflops=989, nvlink_gbps=450, network_gbps=50, host_gbps=50,
                       domain=8),
    # H200: the H100's compute with 141 GB HBM3e (143,771 MiB visible to CUDA).
    "h200": GpuProfile(name="h200", memory_gb=140.4, bf16_tflops=989, nvlink_gbps=450, network_gbps=50, host_gbps=50,
                       domain=8),
    # GB200 (NVL72): 2.5 PFLOP/s dense bf16 per GPU, 186 GB HBM3e, NVLink 5 1.8 TB/s both ways across 72 GPUs, an
    # 800 Gb/s NIC per GPU, NVLink-C2C to the Grace CPU (900 GB/s both ways, shared by two GPUs).
    "gb200": GpuProfile(name="gb200", memory_gb=186, bf16_tflops=2500, nvlink_gbps=900, network_gbps=100,
                        host_gbps=225, domain=72),
}


def load_kernel_figures(path: str, profile: GpuProfile) -> GpuProfile:
    """The profile with measured efficiencies from a tools/gpu_memory_check.py --json result (key
    "kernel_figures": {"gemm_tflops", "attention_tflops", "device"}) or a bare {"gemm_tflops", ...} object."""
    with open(path) as f:
        text = f.read().strip()
    data = json.loads(text.splitlines()[-1]) if text else {}
    figs = data.get("kernel_figures", data)
    if not isinstance(figs, dict) or "gemm_tflops" not in figs:
        raise ValueError(f"{path}: no kernel_figures (gemm_tflops, attention_tflops) in it; run "
                         f"tools/gpu_memory_check.py --json on the GPU first")
    out = replace(profile, gemm_efficiency=float(figs["gemm_tflops"]) / profile.bf16_tflops, source=path)
    if figs.get("attention_tflops"):
        out = replace(out, attention_efficiency=float(figs["attention_tflops"]) / profile.bf16_tflops)
    return out


# -------------------------------------------------------------------------------------------------------------
# Bytes
# -------------------------------------------------------------------------------------------------------------

def attention_comm_bytes(shape: ModelShape, layout: Layout, work: RankWork, e: int) -> Dict[str, int]:
    """MM-SP attention's bytes per rank per layer, forward + backward, as attention/cost.py counts them (even plan)."""
    U, R = layout.ulysses, layout.ring
    hq, hkv = _heads_per_tp(shape.heads, layout.tp), _heads_per_tp(shape.kv_heads, layout.tp)
    lay = head_layout(hq, hkv, U)
    hqs = [b - a for a, b in lay.q_ranges]
    hkvs = [len(x) for x in lay.kv_heads]
    d = shape.head_dim
    s = work.tokens
    row = d * e
    u = 0  # the first Ulysses rank (the most heads under uneven splits)
    others = [t for t in range(U) if t != u]
    uly = 0
    if U > 1:
        uly += s * row * sum(hqs[t] for t in others)  # q to the head owners
        uly += 2 * s * row * sum(hkvs[t] for t in others)  # k, v
        uly += (U - 1) * s * row * hqs[u]  # out back to the token owners
        uly += s * row * sum(hqs[t] for t in others)  # dout
        uly += (U - 1) * s * row * (hqs[u] + 2 * hkvs[u])  # dq, dk, dv back
    ring = 0
    if R > 1 and hqs[u] > 0:
        S = s * U
        kv_row = hkvs[u] * d
        fwd = (R - 1) * S * kv_row * e * 2
        acc = (R - 1) * S * kv_row * max(4, e) * 2
        ring = 2 * fwd + acc
    return {"ulysses": uly, "ring": ring}


def comm_bytes(shape: ModelShape, layout: Layout, work: RankWork, e: int, micro_batches: int,
               setting: ActivationMemoryConfig) -> Dict[str, float]:
    """Bytes one rank sends per step (all micro-batches), by kind. Recompute re-runs the forward's collectives."""
    L = shape.layers // layout.pp
    att = attention_comm_bytes(shape, layout, work, e)
    re_full = setting.llm.granularity == "full"
    re_core = setting.llm.granularity == "selective" and "core_attn" in setting.llm.modules
    # The forward's share of the attention bytes comes again in the backward of a recomputed layer or core attention.
    fwd_share_u = 0.5 if layout.ulysses > 1 else 0.0
    uly = att["ulysses"] * (1 + (fwd_share_u if (re_full or re_core) else 0))
    kv_fwd = att["ring"] * (2 / 6) if att["ring"] else 0  # the forward's KV hops, of 2 fwd + 2 bwd + 2 acc units
    ring = att["ring"] + (kv_fwd if (re_full or re_core) else 0)
    t = layout.tp
    tp = 0.0
    if t > 1:
        # Megatron's TP: per layer two all-reduces (or reduce-scatter + all-gather) forward and two backward of the
        # [s, h] activations; a recomputed forward repeats the forward's two.
        per = 2 * (t - 1) / t * work.tokens * shape.hidden * e
        tp = per * (4 + (2 if re_full else 0))
    out = {"ulysses": uly * L * micro_batches, "ring": ring * L * micro_batches, "tp": tp * L * micro_batches}
    out["pp"] = (2 * work.tokens * shape.hidden * e * micro_batches) if layout.pp > 1 else 0
    out["routing"] = 2 * work.rows_sent * shape.hidden * e * micro_batches if layout.cp > 1 else 0
    g = layout.dp * layout.cp
    params = static_memory(shape, layout, param_bytes=e).params
    out["grad_reduce"] = 2 * (g - 1) / g * params * 4 if g > 1 else 0  # fp32 gradients over DP x CP
    return out


# -------------------------------------------------------------------------------------------------------------
# FLOPs and time
# -------------------------------------------------------------------------------------------------------------

@dataclass
class StepTime:
    """Predicted seconds per step and where they go."""

    seconds: float
    """The step."""
    parts: Dict[str, float] = field(default_factory=dict)
    """Seconds by kind: dense, attention, vision, ulysses, ring (not hidden by compute), tp, pp, routing, offload,
    grad_reduce, bubble."""
    tokens_per_s_per_gpu: float = 0.0
    """Throughput: tokens of the global batch per second per GPU."""
    head_imbalance: float = 1.0
    """max/mean query heads per Ulysses rank (uneven splits cost time, never correctness)."""


def _domain_bw(layout_span: int, domain: int, profile: GpuProfile) -> float:
    """Bandwidth of a group of consecutive ranks spanning `layout_span` GPUs: NVLink inside a domain, else the
    network (a ring or all-to-all is as fast as its slowest link)."""
    return profile.nvlink_gbps * 1e9 if layout_span <= domain else profile.network_gbps * 1e9


def step_time(shape: ModelShape, layout: Layout, seq_length: int, frames: int, global_batch: int,
              setting: ActivationMemoryConfig, profile: GpuProfile, *, domain: Optional[int] = None,
              offloaded_bytes: float = 0.0, frame_px: Optional[int] = None, e: int = 2) -> StepTime:
    """Seconds per step for `global_batch` sequences of `seq_length` tokens (`frames` video frames each)."""
    domain = domain or profile.domain
    m = max(global_batch // layout.dp, 1)  # micro-batches per replica per step
    work = even_rank_work(shape, layout, seq_length, frames, frame_px)
    L = shape.layers // layout.pp
    t, cp = layout.tp, layout.cp
    gemm = profile.bf16_tflops * 1e12 * profile.gemm_efficiency
    attn_rate = profile.bf16_tflops * 1e12 * profile.attention_efficiency
    h, f = shape.hidden, shape.ffn
    layer_params = h * h * (shape.heads + 2 * shape.kv_heads) / shape.heads + h * h + 3 * h * f  # QKV, proj, MLP
    re_full = setting.llm.granularity == "full"
    re_core = setting.llm.granularity == "selective" and "core_attn" in setting.llm.modules
    dense_mult = 8 if re_full else 6
    # Dense work of one micro-batch on this rank: its tokens through this stage's layers, split by TP.
    tokens = work.tokens
    dense = dense_mult * layer_params * tokens * L / t
    # Logits and embedding on their stages (the output projection: 6 V h per token).
    dense_head = 6 * shape.vocab * h * tokens / t
    # Causal attention of one whole-sequence document: 2 T^2 h forward FLOPs per layer (half the square), the
    # backward 2.5 x that; recompute adds a forward. Per rank: 1/(CP TP), scaled by the head imbalance.
    hq = _heads_per_tp(shape.heads, t)
    lay = head_layout(hq, _heads_per_tp(shape.kv_heads, t), layout.ulysses)
    most = max(b - a for a, b in lay.q_ranges)
    imbalance = most / (hq / layout.ulysses)
    attn_fwd = 2 * seq_length ** 2 * h / (cp * t) * imbalance
    attn = attn_fwd * (1 + 2.5 + (1 if (re_full or re_core) else 0)) * L
    # The encoder on the first stage: its frames split over CP (stage 1), heads and MLP over TP.
    vis = 0.0
    if frames:
        per_rank = -(-frames // cp)
        patches = (shape.image // shape.patch) ** 2
        vh, vf = shape.v_hidden, shape.v_ffn
        vparams = shape.v_layers_run * (4 * vh * vh + 2 * vh * vf)
        vis_mult = 8 if setting.vision.granularity == "full" else 6
        vis = (vis_mult * vparams * patches * per_rank + 4 * 3.5 * patches ** 2 * vh * shape.v_layers_run
               * per_rank) / t
    compute_micro = {"dense": (dense + dense_head / max(layout.pp, 1)) / gemm, "attention": attn / attn_rate,
                     "vision": vis / gemm / max(layout.pp, 1)}
    cb = comm_bytes(shape, layout, work, e, 1, setting)
    uly_bw = _domain_bw(t * layout.ulysses, domain, profile)
    # The ring's neighbours are U*TP ranks apart: inside a domain while the whole ring fits, else over the network.
    ring_bw = _domain_bw(t * cp, domain, profile)
    tp_bw = _domain_bw(t, domain, profile)
    net = profile.network_gbps * 1e9
    comm_micro = {"ulysses": cb["ulysses"] / uly_bw, "tp": cb["tp"] / tp_bw, "pp": cb["pp"] / net,
                  "routing": cb["routing"] / _domain_bw(t * cp, domain, profile)}
    # The ring's exchange is hidden behind its attention blocks: only what exceeds them costs time, plus each step's
    # fixed cost (R steps forward, R backward, R again in a recomputed forward, per layer).
    passes = 3 if (re_full or re_core) else 2
    lat = profile.step_latency_s
    comm_micro["ring"] = max(cb["ring"] / ring_bw - compute_micro["attention"], 0.0) \
        + (layout.ring * passes * L * lat if layout.ring > 1 else 0.0)
    # Ulysses: four all-to-alls forward (q, k, v, out) and four backward per layer; TP: four collectives per layer.
    comm_micro["ulysses"] += (4 * passes * L * lat if layout.ulysses > 1 else 0.0)
    comm_micro["tp"] += (2 * (passes + 0) * L * lat if t > 1 else 0.0)
    comm_micro["offload"] = 2 * offloaded_bytes / (profile.host_gbps * 1e9)
    micro = sum(compute_micro.values()) + sum(comm_micro.values())
    # 1F1B: (PP - 1) micro-batch slots of bubble; the gradient all-reduce after the last backward.
    bubble = (layout.pp - 1) * micro
    grad = cb["grad_reduce"] / (net if layout.world > domain else profile.nvlink_gbps * 1e9)
    total = m * micro + bubble + grad
    parts = {k: v * m for k, v in {**compute_micro, **comm_micro}.items()}
    parts.update(bubble=bubble, grad_reduce=grad)
    tokens_step = global_batch * seq_length
    return StepTime(seconds=total, parts=parts, tokens_per_s_per_gpu=tokens_step / total / layout.world,
                    head_imbalance=imbalance)

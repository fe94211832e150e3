"""The mesh planner: every layout (TP, U, R, PP, DP) of a GPU count with the activation setting that fits, ranked by
the predicted step time, and the reason for each layout that cannot run.

    Cluster                                   the GPUs (count, NVLink domain, memory, profile)
    SETTINGS                                  recompute/offload settings tried, fastest first
    plan_mesh(shape, cluster, ...) -> (plans, infeasible)
    megatron_flags(plan, ...) -> list         the command line of a plan
    paper_comparison(...) -> rows             the cost model on LongVILA's baselines (docs/SCALING.md)

Rules (each infeasible layout gets the first that fails):
- divisibility: TP must divide the query heads, the FFN and the encoder's heads, and divide or be divided by the KV
  heads; PP must divide the LLM's layers; --seq-length must divide by CP x TP (TP runs with sequence parallelism);
  the global batch by DP;
- a Ulysses degree above the query heads TP leaves (a Ulysses rank would hold no head); uneven splits are allowed
  and cost time (the head imbalance in the time model);
- TP and Ulysses groups are consecutive ranks (Megatron's order: TP, then CP with Ulysses inner) and must lie
  inside one NVLink domain: TP x U must divide the domain; rings and pipelines may cross domains;
- memory: not even the most frugal setting (full recompute with offload) fits the GPU.
Plans assume Megatron's distributed optimizer (optimizer state sharded over DP x CP), bf16 weights with fp32
gradient buffers and Adam state, GPU kernels that fuse norms (KernelSaves GPU_KERNELS), and a 1F1B pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from ..models.offload import ActivationMemoryConfig, RecomputeConfig
from .memory import (GPU_KERNELS, MEMORY_MARGIN, Layout, ModelShape, Workload, even_rank_work, memory_budget_gib,
                     predict_rank_memory, rank_memory_gb)
from .timing import GpuProfile, PROFILES, step_time


@dataclass(frozen=True)
class Cluster:
    """The GPUs a plan is for."""

    gpus: int
    """GPUs in the job."""
    gpus_per_domain: int
    """GPUs per NVLink domain (8 in an HGX node; 72 in a GB200 NVL72 rack)."""
    gpu_memory_gb: float
    """Usable device memory per GPU (GiB)."""
    profile: GpuProfile = PROFILES["h100"]
    """Throughput and bandwidths."""
    memory_margin: float = MEMORY_MARGIN
    """Share of the memory a plan keeps free (planning.memory.MEMORY_MARGIN)."""

    @property
    def budget_gb(self) -> float:
        """The predicted peak a plan may reach."""
        return memory_budget_gib(self.gpu_memory_gb, self.memory_margin)


def _full(method: str, n: int) -> ActivationMemoryConfig:
    return ActivationMemoryConfig(llm=RecomputeConfig(granularity="full", method=method, num_layers=n),
                                  vision=RecomputeConfig(granularity="full", method=method, num_layers=n,
                                                         flag_prefix="--vision-recompute"))


def settings_for(layers_per_stage: int) -> List[Tuple[str, ActivationMemoryConfig]]:
    """Settings tried for a stage of `layers_per_stage` layers, fastest first (the planner keeps the first that fits
    unless a later one is faster)."""
    out = [("none", ActivationMemoryConfig()),
           ("selective", ActivationMemoryConfig(llm=RecomputeConfig(granularity="selective"),
                                                vision=RecomputeConfig(granularity="selective",
                                                                       flag_prefix="--vision-recompute")))]
    half = layers_per_stage // 2
    if half >= 1 and half < layers_per_stage:
        out.append((f"full-block-{half}", replace(_full("block", half), vision=ActivationMemoryConfig().vision)))
    out.append(("full", _full("uniform", 1)))
    out.append(("offload", ActivationMemoryConfig(offload=True)))
    out.append(("full+offload", replace(_full("uniform", 1), offload=True)))
    return out


@dataclass
class Plan:
    """One layout with its best setting."""

    tp: int
    """Tensor-parallel size."""
    ulysses: int
    """Ulysses size U."""
    ring: int
    """Ring size R."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    recompute: str
    """The recompute setting's label (none, selective(core_attn), full-uniform-1, ...)."""
    offload: bool
    """Activation offload on."""
    memory_gb: float
    """Predicted device memory of the most loaded rank (GiB)."""
    step_time_s: float
    """Predicted seconds per step."""
    flags: List[str]
    """Megatron's (and LongVILA's) flags for it."""
    memory: Dict[str, float] = field(default_factory=dict)
    """memory_gb by part."""
    time: Dict[str, float] = field(default_factory=dict)
    """step_time_s by part."""
    tokens_per_s_per_gpu: float = 0.0
    """Predicted throughput."""
    head_imbalance: float = 1.0
    """max/mean query heads per Ulysses rank (uneven splits cost time)."""
    setting: str = ""
    """The planner's name of the setting."""

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_reason(shape: ModelShape, cluster: Cluster, tp: int, u: int, r: int, pp: int, dp: int, seq_length: int,
                  global_batch: int) -> Optional[str]:
    """Why a layout cannot run (None: it can, memory aside)."""
    cp = u * r
    if shape.heads % tp or shape.ffn % tp or shape.v_heads % tp or shape.v_ffn % tp:
        return (f"divisibility: TP {tp} does not divide the query heads ({shape.heads}), the FFN ({shape.ffn}) and "
                f"the encoder's heads ({shape.v_heads}) and MLP ({shape.v_ffn})")
    if shape.kv_heads % tp and tp % shape.kv_heads:
        return f"divisibility: TP {tp} and the KV heads ({shape.kv_heads}) do not divide one another"
    if shape.layers % pp:
        return f"divisibility: PP {pp} does not divide the LLM's {shape.layers} layers"
    if seq_length % (cp * tp):
        return f"divisibility: --seq-length {seq_length} is not a multiple of CP x TP = {cp * tp}"
    if global_batch % dp:
        return f"divisibility: the global batch ({global_batch}) is not a multiple of DP {dp}"
    if u > shape.heads // tp:
        return (f"Ulysses above the query heads: U {u} > the {shape.heads // tp} query heads per rank that TP {tp} "
                f"leaves (a Ulysses rank would hold none)")
    d = cluster.gpus_per_domain
    if tp * u > d or d % (tp * u):
        return (f"crosses the NVLink domain: TP x Ulysses = {tp * u} consecutive GPUs do not fit a domain of {d} "
                f"(all-to-all and TP collectives need NVLink)")
    return None


def megatron_flags(plan: Plan, setting: ActivationMemoryConfig, seq_length: int, global_batch: int) -> List[str]:
    f = ["--tensor-model-parallel-size", str(plan.tp), "--pipeline-model-parallel-size", str(plan.pp),
         "--context-parallel-size", str(plan.ulysses * plan.ring),
         "--hierarchical-context-parallel-sizes", str(plan.ulysses), str(plan.ring), "--cp-comm-type", "a2a+p2p"]
    if plan.tp > 1:
        f.append("--sequence-parallel")
    f += ["--use-distributed-optimizer", "--seq-length", str(seq_length), "--micro-batch-size", "1",
          "--global-batch-size", str(global_batch), "--bf16"]
    return f + setting.flags()


def evaluate(shape: ModelShape, cluster: Cluster, layout: Layout, seq_length: int, frames: int, global_batch: int,
             name: str, setting: ActivationMemoryConfig, frame_px: Optional[int] = None) -> Plan:
    """Memory and step time of one layout and setting."""
    m = max(global_batch // layout.dp, 1)
    mem = rank_memory_gb(shape, layout, Workload(seq_length=seq_length, frames=frames, frame_px=frame_px,
                                                 micro_batches=m), setting)
    offloaded = 0.0
    if setting.offload:
        rw = even_rank_work(shape, layout, seq_length, frames, frame_px)
        offloaded = predict_rank_memory(shape, layout, rw, setting, micro_batches=m, stage=0, element_bytes=2,
                                        kernels=GPU_KERNELS).offloaded_bytes
    st = step_time(shape, layout, seq_length, frames, global_batch, setting, cluster.profile,
                   domain=cluster.gpus_per_domain, offloaded_bytes=offloaded, frame_px=frame_px)
    plan = Plan(tp=layout.tp, ulysses=layout.ulysses, ring=layout.ring, pp=layout.pp, dp=layout.dp,
                recompute=setting.llm.label, offload=setting.offload, memory_gb=mem["total"], step_time_s=st.seconds,
                flags=[], memory=mem, time=st.parts, tokens_per_s_per_gpu=st.tokens_per_s_per_gpu,
                head_imbalance=st.head_imbalance, setting=name)
    plan.flags = megatron_flags(plan, setting, seq_length, global_batch)
    return plan


def plan_mesh(shape: ModelShape, cluster: Cluster, seq_length: int, frames: int = 0,
              global_batch: Optional[int] = None, frame_px: Optional[int] = None, max_tp: int = 8
              ) -> Tuple[List[Plan], List[dict]]:
    """(plans best first, one per layout that fits; infeasible layouts with their reason)."""
    gb = global_batch or max(1, cluster.gpus // 8)
    plans, infeasible = [], []
    for tp in [d for d in _divisors(cluster.gpus) if d <= max_tp]:
        for pp in _divisors(cluster.gpus // tp):
            if pp > shape.layers:
                continue
            for cp in _divisors(cluster.gpus // (tp * pp)):
                dp = cluster.gpus // (tp * pp * cp)
                for u in _divisors(cp):
                    r = cp // u
                    lay = {"tp": tp, "ulysses": u, "ring": r, "pp": pp, "dp": dp}
                    why = layout_reason(shape, cluster, tp, u, r, pp, dp, seq_length, gb)
                    if why:
                        infeasible.append({"layout": lay, "reason": why, "kind": why.split(":")[0]})
                        continue
                    layout = Layout(tp=tp, pp=pp, ulysses=u, ring=r, dp=dp, sequence_parallel=tp > 1,
                                    distributed_optimizer=True)
                    best, frugal = None, None
                    for name, setting in settings_for(shape.layers // pp):
                        p = evaluate(shape, cluster, layout, seq_length, frames, gb, name, setting, frame_px)
                        frugal = p if frugal is None or p.memory_gb < frugal.memory_gb else frugal
                        if p.memory_gb <= cluster.budget_gb and (best is None or p.step_time_s < best.step_time_s):
                            best = p
                    if best is None:
                        infeasible.append({"layout": lay, "kind": "memory", "reason": (
                            f"memory: {frugal.memory_gb:.1f} GiB per GPU even with {frugal.setting} "
                            f"(the GPU has {cluster.gpu_memory_gb:g} GiB, of which a plan may take "
                            f"{cluster.budget_gb:.1f})")})
                    else:
                        plans.append(best)
    plans.sort(key=lambda p: p.step_time_s)
    return plans, infeasible


# -------------------------------------------------------------------------------------------------------------
# LongVILA's baselines
# -------------------------------------------------------------------------------------------------------------

PAPER = {"vs_ring": (2.1, 5.7), "vs_megatron_cp_tp": (1.1, 1.4), "max_tokens_256_gpus": 2_000_000}
"""What the LongVILA paper reports for MM-SP against its baselines on 32 to 256 H100s (8B LLM)."""


def paper_comparison(shape: ModelShape, gpus_list: Sequence[int] = (32, 64, 128, 256),
                     seq_lengths: Sequence[int] = (102_400, 262_144, 524_288, 1_048_576, 2_097_152),
                     setting_name: str = "full", gpu: str = "h100", domain: int = 8,
                     memory_gb: float = 80.0) -> List[dict]:
    """Step time of MM-SP (U = GPUs per node, R = nodes) against zigzag ring attention alone (U = 1, R = all GPUs)
    and Megatron's TP inside a node with p2p ring CP across nodes (TP = 8, R = nodes), one sequence per step,
    text-only (the LLM's attention is what the paper compares), full recompute."""
    profile = PROFILES[gpu]
    cluster = Cluster(gpus=0, gpus_per_domain=domain, gpu_memory_gb=memory_gb, profile=profile)
    setting = dict(settings_for(shape.layers))[setting_name]
    rows = []
    for g in gpus_list:
        nodes = g // domain
        layouts = {"mmsp": Layout(tp=1, ulysses=domain, ring=nodes, distributed_optimizer=True),
                   "ring": Layout(tp=1, ulysses=1, ring=g, distributed_optimizer=True),
                   "megatron_tp_cp": Layout(tp=domain, ulysses=1, ring=nodes, sequence_parallel=True,
                                            distributed_optimizer=True)}
        for T in seq_lengths:
            row = {"gpus": g, "seq_length": T, "setting": setting_name}
            for key, lay in layouts.items():
                if T % (lay.cp * lay.tp):
                    row[key] = None
                    continue
                cl = replace(cluster, gpus=g)
                p = evaluate(shape, cl, lay, T, 0, 1, setting_name, setting)
                # The paper's figures are sequence-parallel throughput: the step without the gradient all-reduce,
                # which does not depend on the attention layout (and overlaps the backward in tuned runs).
                row[key] = {"step_time_s": p.step_time_s, "memory_gb": p.memory_gb,
                            "fits": p.memory_gb <= memory_gb, "time": p.time,
                            "without_grad_reduce_s": p.step_time_s - p.time.get("grad_reduce", 0.0)}
            for base, name in (("ring", "ring_over_mmsp"), ("megatron_tp_cp", "megatron_over_mmsp")):
                if row.get("mmsp") and row.get(base):
                    row[name] = row[base]["without_grad_reduce_s"] / row["mmsp"]["without_grad_reduce_s"]
                    row[name + "_with_grad_reduce"] = row[base]["step_time_s"] / row["mmsp"]["step_time_s"]
            rows.append(row)
    return rows

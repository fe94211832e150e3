"""The memory model: bytes per rank of LongVILA training, as pure functions of shapes and layout.

    ModelShape, Layout, RankWork, KernelSaves       what the model takes (dataclasses, one docstring per field)
    rank_work_of(planned, model) -> RankWork        this rank's actual work in a planned micro-batch (benchmarks)
    even_rank_work(shape, layout, seq_length, frames, frame_px) -> RankWork   the average rank (the planner)
    llm_layer_saved(...), vision_layer_saved(...)   bytes one layer keeps for the backward, by named term
    stage_groups(...) -> [Group]                    what each piece of a stage's forward keeps, in forward order
    predict_rank_memory(shape, layout, work, setting, ...) -> RankMemory  activations: saved, offloaded, peak
    static_memory(shape, layout, ...) -> StaticMemory   parameters, gradient buffers, optimizer state
    rank_memory_gb(...)                              everything together, for the planner

What is counted, and why each term exists (elements per token unless stated; e = activation element bytes, 2 for
bf16, 4 for fp32; h hidden, f FFN width, d head dim, hq/hkv query/KV heads per TP rank, t TP size):

LLM layer (megatron-core's TransformerLayer with the MM-SP spec):
- each norm keeps its input x (h) and, as composite kernels do (the CPU build), the normalized x (h) and the
  reciprocal RMS (1); a fused norm (KernelSaves.fused_norm, GPUs) keeps x and the fp32 rstd only;
- each column-parallel linear keeps its input (h; under sequence parallelism the 1/t shard it gathers again);
- RoPE keeps cos and sin of this rank's positions for q and for k (4 d_rot);
- core attention: the ring keeps its q, k, v buffers (this rank's Ulysses heads of the ring rank's tokens, i.e.
  about hq d + 2 hkv d per local token), its output (hq d) and the fp32 log-sum-exp (hq); without Ulysses and
  padding the q, k, v buffers are RoPE's outputs and v is a view of the QKV projection's output, which is kept
  whole ((hq + 2 hkv) d); the row-parallel output projection keeps its input (hq d, the attention output);
- the SwiGLU MLP keeps the FC1 output (2f/t), the up half as its own tensor (f/t), SiLU's output (f/t) and FC2's
  input (f/t).
Vision layer (SigLIP, LayerNorm, biases): each LayerNorm x (h) + fp32 mean and rstd (2); linear inputs (h); the
QKV output (3h/t, whose views SDPA keeps), SDPA's output (h/t) and fp32 log-sum-exp (heads/t); GELU's input and
output (f/t each).
Outside the blocks: the embedding's token ids (int64), stage 2's index tensors and received rows, the projector
(LayerNorm on 4C, linear inputs, GELU), the patch convolution's input pixels, the post-LayerNorm, the final norm,
the output layer's input, and the cross entropy's fp32 softmax over the vocabulary shard with its int64 targets.

Recompute: "full" keeps only each checkpoint's input (s h e) for the recomputed layers (and the rotary table once,
which every checkpoint takes); "selective" core_attn keeps the core attention's inputs (q, k and v, i.e. the QKV
projection output) instead of the ring's buffers, output and log-sum-exp. Offload moves everything the blocks save
except integer tensors and the rotary table to host memory.

Peak (the most storage alive at once during a step's forward and backward, above what exists before the step): the
saved bytes of every micro-batch in flight on the stage (1F1B keeps up to PP - stage of them; at most the
micro-batches of a step) plus the largest transient of the backward: the cross entropy's gradient over the vocabulary
(with the output projection's weight gradient), a recomputed layer's activations with its backward's working set,
the ring backward's buffers (dq, dk, dv accumulators and the KV in flight), and, on the first stage, the embedding's
dense weight gradient. Communication buffers of the ring's forward (the next KV block) and stage 2 are counted
where they are alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..models.offload import ActivationMemoryConfig, RecomputeConfig
from ..models.registry import ENCODERS, LLMS
from ..plan.ulysses import head_layout
from ..runtime.modules import unwrap_model

GiB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    """The shapes the memory model needs (from a registry entry, a built model or a checkpoint's record)."""

    hidden: int
    """LLM width h."""
    layers: int
    """LLM layers."""
    heads: int
    """LLM query heads."""
    kv_heads: int
    """LLM KV heads (GQA groups)."""
    ffn: int
    """LLM SwiGLU inner width f."""
    vocab: int
    """LLM vocabulary (padded)."""
    qkv_bias: bool = True
    """Bias on the LLM's QKV projection."""
    tie_embeddings: bool = False
    """Input embedding shared with the output layer."""
    v_hidden: int = 1152
    """Encoder width."""
    v_layers: int = 27
    """Encoder layers in the state."""
    v_layers_run: int = 27
    """Encoder layers the forward runs (select_layer)."""
    v_heads: int = 16
    """Encoder heads."""
    v_ffn: int = 4304
    """Encoder MLP width."""
    patch: int = 14
    """Patch size in pixels."""
    image: int = 384
    """Native frame size in pixels."""
    v_post_norm: bool = True
    """The encoder's forward applies its post-LayerNorm."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_configs(cls, llm, vision) -> "ModelShape":
        """From an LLMShape and a VisionConfig."""
        run = getattr(vision, "layers_run", vision.num_layers)
        post = getattr(vision, "runs_post_layernorm", vision.post_layernorm)
        return cls(hidden=llm.hidden_size, layers=llm.num_layers, heads=llm.num_attention_heads,
                   kv_heads=llm.num_query_groups, ffn=llm.ffn_hidden_size, vocab=llm.vocab_size,
                   qkv_bias=llm.qkv_bias, tie_embeddings=llm.tie_embeddings, v_hidden=vision.hidden_size,
                   v_layers=vision.num_layers, v_layers_run=run, v_heads=vision.num_attention_heads,
                   v_ffn=vision.ffn_hidden_size, patch=vision.patch_size, image=vision.image_size,
                   v_post_norm=bool(post))

    @classmethod
    def from_names(cls, llm: str, encoder: str) -> "ModelShape":
        return cls.from_configs(LLMS[llm], ENCODERS[encoder])

    @classmethod
    def of(cls, model) -> "ModelShape":
        """From a built LongVILAModel (any pipeline stage: the LLM's full depth is read from its config)."""
        m = unwrap_model(model)
        c = m.language_model.model.config
        gpt = m.language_model.model
        vocab = gpt.vocab_size if hasattr(gpt, "vocab_size") else 0
        v = m.vision_model
        base = dict(hidden=c.hidden_size, layers=c.num_layers, heads=c.num_attention_heads,
                    kv_heads=c.num_query_groups or c.num_attention_heads, ffn=c.ffn_hidden_size, vocab=vocab,
                    qkv_bias=bool(c.add_qkv_bias),
                    tie_embeddings=bool(getattr(gpt, "share_embeddings_and_output_weights", False)))
        if v is not None:
            vc = v.cfg
            base.update(v_hidden=vc.hidden_size, v_layers=vc.num_layers, v_layers_run=vc.layers_run,
                        v_heads=vc.num_attention_heads, v_ffn=vc.ffn_hidden_size, patch=vc.patch_size,
                        image=vc.image_size, v_post_norm=vc.runs_post_layernorm)
        return cls(**base)


@dataclass(frozen=True)
class Layout:
    """How the model is laid out over GPUs."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ulysses: int = 1
    """Ulysses size U (heads over an NVLink domain)."""
    ring: int = 1
    """Ring size R (sequence across domains)."""
    dp: int = 1
    """Data-parallel size."""
    sequence_parallel: bool = False
    """TP sequence parallelism (norms and residuals on 1/TP of the tokens)."""
    distributed_optimizer: bool = False
    """Megatron's distributed optimizer: optimizer state sharded over DP x CP."""

    @property
    def cp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class FrameWork:
    """Frames of one resolution that a rank encodes."""

    count: int
    """Frames."""
    height: int
    """Pixels."""
    width: int
    """Pixels."""
    patch: int
    """Patch size."""

    @property
    def patches(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def tokens(self) -> int:
        """LLM tokens per frame after the 2x2 downsample."""
        r, c = self.height // self.patch, self.width // self.patch
        return ((r + 1) // 2) * ((c + 1) // 2)


@dataclass(frozen=True)
class RankWork:
    """One CP rank's share of one micro-batch."""

    tokens: int
    """LLM tokens this rank holds (pads included): s."""
    ring_rows: int
    """Real rows of this rank's ring buffer: the tokens of its ring rank's Ulysses group (about U s)."""
    heads_q: int
    """Query heads this rank's ring buffer holds (after TP and Ulysses split the heads)."""
    heads_kv: int
    """KV heads this rank's ring buffer holds."""
    padded: bool = False
    """The plan pads some rank's shard (pads are removed from ring buffers by a copy)."""
    frames: Tuple[FrameWork, ...] = ()
    """Frames this rank encodes, grouped by resolution (stage 1)."""
    rows_sent: int = 0
    """Stage 2: visual rows this rank sends (its own included)."""
    rows_received: int = 0
    """Stage 2: visual rows this rank receives (its own included)."""
    max_doc: int = 0
    """Longest document of the micro-batch (the rotary table's length)."""
    ring_lens: Tuple[int, ...] = ()
    """Real rows of each ring rank's buffer (the KV blocks that travel)."""

    @property
    def frame_tokens(self) -> int:
        return sum(f.count * f.tokens for f in self.frames)


@dataclass(frozen=True)
class KernelSaves:
    """What the kernels keep for the backward where implementations differ."""

    fused_norm: bool = False
    """The norm kernel keeps only its input and an fp32 rstd (GPU fused RMSNorm/LayerNorm); False: composite ops
    also keep the normalized tensor (the CPU build)."""
    norm_stat_bytes: int = 4
    """Bytes of each per-token norm statistic (rsqrt in the activation dtype for composite RMSNorm on CPU fp32;
    fp32 for fused kernels and LayerNorm)."""


CPU_KERNELS = KernelSaves()
GPU_KERNELS = KernelSaves(fused_norm=True)


def _heads_per_tp(n: int, tp: int) -> int:
    return max(n // tp, 1)


def rank_work_of(planned, model) -> RankWork:
    """This rank's work in a PlannedMicroBatch (its real token and frame counts)."""
    m = unwrap_model(model)
    plan = planned.plan
    c = m.language_model.model.config
    tp = c.tensor_model_parallel_size
    hq, hkv = _heads_per_tp(c.num_attention_heads, tp), _heads_per_tp(c.num_query_groups, tp)
    lay = head_layout(hq, hkv, plan.ulysses_size)
    u = plan.mesh.ulysses_rank
    r = plan.mesh.ring_rank
    a, b = lay.q_ranges[u]
    frames = []
    p = m.vision_model.cfg.patch_size if m.vision_model is not None else 14
    for g in planned.groups:
        frames.append(FrameWork(count=len(g.frames), height=g.size[0], width=g.size[1], patch=p))
    rp = planned.routing
    return RankWork(tokens=plan.local_len, ring_rows=plan.ring_lens[r], heads_q=b - a, heads_kv=len(lay.kv_heads[u]),
                    padded=bool(plan.padded), frames=tuple(frames),
                    rows_sent=int(sum(rp.send_counts)) if rp is not None else 0,
                    rows_received=int(sum(rp.recv_counts)) if rp is not None else 0,
                    max_doc=int(plan.max_doc_len), ring_lens=tuple(int(x) for x in plan.ring_lens))


MEMORY_MARGIN = 0.05
"""The share of a GPU's memory a plan keeps free (allocator fragmentation, NCCL's and the kernels' buffers beyond the
model's workspace): a plan fits when its predicted peak is at most (1 - MEMORY_MARGIN) of the memory."""


def memory_budget_gib(gpu_gib: float, margin: float = MEMORY_MARGIN) -> float:
    """The predicted peak a GPU of `gpu_gib` takes (the planner's and the dry run's verdict)."""
    return gpu_gib * (1.0 - margin)


VIDEO_FRACTION = 0.9
"""The share of a sequence a plan gives to video when the frames are not known (the visual-heavy case)."""


def planned_frames(seq_length: int, tokens_per_frame: int, media: bool = True) -> int:
    """Frames a plan assumes in one sequence: video fills VIDEO_FRACTION of it (each frame's tokens and its media
    token), none for a text-only stage. The planner and the dry run take the same figure."""
    return int(VIDEO_FRACTION * seq_length / (tokens_per_frame + 1)) if media else 0


def even_rank_work(shape: ModelShape, layout: Layout, seq_length: int, frames: int, frame_px: Optional[int] = None,
                   max_doc: Optional[int] = None) -> RankWork:
    """The average CP rank of a micro-batch of `seq_length` tokens holding `frames` video frames (the planner)."""
    s = -(-seq_length // layout.cp)
    hq, hkv = _heads_per_tp(shape.heads, layout.tp), _heads_per_tp(shape.kv_heads, layout.tp)
    lay = head_layout(hq, hkv, layout.ulysses)
    # The rank with the most heads sets the memory (uneven splits: the first ranks hold one more).
    a, b = lay.q_ranges[0]
    px = frame_px or shape.image
    per_rank = -(-frames // layout.cp) if frames else 0
    fw = FrameWork(count=per_rank, height=px, width=px, patch=shape.patch)
    rows = per_rank * fw.tokens
    return RankWork(tokens=s, ring_rows=s * layout.ulysses, heads_q=b - a, heads_kv=len(lay.kv_heads[0]),
                    padded=False, frames=(fw,) if per_rank else (), rows_sent=rows, rows_received=rows,
                    max_doc=max_doc or seq_length, ring_lens=tuple([s * layout.ulysses] * layout.ring))


# -------------------------------------------------------------------------------------------------------------
# Saved for the backward
# -------------------------------------------------------------------------------------------------------------

def _norm(tokens: int, width: int, e: int, k: KernelSaves, layernorm: bool = False) -> int:
    if layernorm:  # native LayerNorm: input + fp32 mean and rstd
        return tokens * (width * e + 8)
    if k.fused_norm:
        return tokens * (width * e + 4)
    return tokens * (2 * width * e + k.norm_stat_bytes)


@dataclass
class Group:
    """What one piece of the forward keeps for its backward (bytes on this rank, one micro-batch)."""

    name: str
    """Which piece (llm.layer3, vision.layer0, projector, loss, ...)."""
    part: str
    """llm (inside the LLM's transformer block), vision (inside the encoder's block) or rest."""
    stored: int
    """Distinct storage it keeps on the device (without offload)."""
    views: int = 0
    """Bytes of the tensors it keeps, each view counted by its own size (what offload copies); 0: = stored."""
    pre: int = 0
    """Of `stored`, storage that exists before the step (the planned micro-batch's pixels and index tensors)."""
    keep_on_device: int = 0
    """Of `stored`, what offload leaves on the device (integer tensors, the rotary table)."""
    recompute: int = 0
    """Activations re-created when its backward runs (full recompute: the layer's own saved bytes)."""
    workspace: int = 0
    """Memory its backward allocates beyond what it frees (gradients in flight, kernel buffers)."""
    forward_live: int = 0
    """Under offload: what its forward has alive at once (the larger of a layer's attention and MLP halves, whose
    saved tensors leave for the host only as the half finishes)."""
    forward_extra: int = 0
    """Without offload: temporaries of its forward that are not kept (kernel outputs before the merge, the residual
    stream)."""
    backward_phases: Tuple[Tuple[int, int, int], ...] = ()
    """Its backward's phases as (bytes offload brought back for it, working set, bytes of its saved (or
    re-created) activations that earlier phases of its backward already freed): the largest sets the peak."""

    @property
    def moved(self) -> int:
        return (self.views or self.stored) - self.keep_on_device


def llm_layer_saved(shape: ModelShape, layout: Layout, work: RankWork, e: int, kernels: KernelSaves = CPU_KERNELS,
                    recompute: Optional[RecomputeConfig] = None, views: bool = False) -> Dict[str, int]:
    """Bytes one LLM layer keeps for the backward on this rank, per micro-batch, by term (no recompute / selective).

    views: count each kept tensor by its own size (what offload copies) instead of distinct storage."""
    t = layout.tp
    s = work.tokens
    h, d = shape.hidden, shape.head_dim
    hq, hkv = _heads_per_tp(shape.heads, t), _heads_per_tp(shape.kv_heads, t)
    s_norm = s // t if layout.sequence_parallel else s
    f = shape.ffn // t
    S = work.ring_rows
    out: Dict[str, int] = {}
    out["norms"] = 2 * _norm(s_norm, h, e, kernels)
    out["linear_inputs"] = 2 * s_norm * h * e  # QKV and FC1 inputs
    out["rope"] = 4 * s * d * e
    selective = recompute is not None and recompute.granularity == "selective"
    core = selective and "core_attn" in recompute.modules
    plain = layout.ulysses == 1 and not work.padded
    qkv_out = (hq + 2 * hkv) * d  # the QKV projection's output, of which v is a view
    if core:
        # The checkpoint keeps q and k after RoPE and v; 4 bytes of mask type.
        out["attention"] = s * (hq * d + hkv * d + (hkv * d if views else qkv_out)) * e + 4
        out["attention_out"] = s * hq * d * e  # the checkpoint's output, the projection's input
    elif plain:
        # q and k after RoPE and v are the ring's buffers; the ring's output and fp32 log-sum-exp
        out["attention"] = s * (hq * d + hkv * d + (hkv * d if views else qkv_out)) * e \
            + S * work.heads_q * d * e + work.heads_q * S * 4
        out["attention_out"] = s * hq * d * e if views else 0  # a view of the ring's output
    else:
        # Ring buffers after the all-to-all (and pad compaction): this rank's heads of the ring rank's tokens.
        out["attention"] = S * (work.heads_q + 2 * work.heads_kv) * d * e + S * work.heads_q * d * e \
            + work.heads_q * S * 4
        out["attention_out"] = s * hq * d * e
    if selective and "mlp" in recompute.modules:
        out["mlp"] = 0  # the checkpoint's input is FC1's input, already counted
    else:
        out["mlp"] = (4 if views else 5) * s * f * e  # FC1 output (gate a view of it), up, SiLU, FC2 input
    return out


def vision_layer_saved(shape: ModelShape, layout: Layout, work: RankWork, e: int,
                       recompute: Optional[RecomputeConfig] = None, views: bool = False) -> Dict[str, int]:
    """Bytes one encoder layer keeps on this rank for its frames (no recompute / selective)."""
    t = layout.tp
    n = sum(fw.count * fw.patches for fw in work.frames)
    h, f, heads = shape.v_hidden, shape.v_ffn // t, _heads_per_tp(shape.v_heads, t)
    hp = h // t
    out = {"norms": 2 * n * (h * e + 8), "linear_inputs": 2 * n * h * e}
    core = recompute is not None and recompute.granularity == "selective" and "core_attn" in recompute.modules
    # q, k, v views of the QKV output; SDPA's output (the projection's input is a view of it) and its fp32 lse
    out["attention"] = n * 3 * hp * e + n * hp * e * (2 if views and not core else 1) \
        + (4 if core else n * heads * 4)
    out["mlp"] = 2 * n * f * e
    return out


def plain_ring(layout: Layout, work: RankWork) -> bool:
    """No Ulysses all-to-all and no pad compaction: the ring's buffers are views of RoPE's outputs."""
    return layout.ulysses == 1 and not work.padded


def _rope_table(work: RankWork, shape: ModelShape) -> int:
    return work.max_doc * shape.head_dim * 4  # fp32 [max_doc, 1, 1, d]


def _layer_groups(prefix: str, part: str, layers: int, one: int, one_views: int, recompute: RecomputeConfig,
                  checkpoint_input: int, shared_once: int, phases: Tuple[Tuple[int, int], ...],
                  kept_per_layer: int, forward_live: int, forward_extra: int) -> List[Group]:
    """A stage's layers under `recompute`: a recomputed layer (or uniform group) keeps its checkpoint input and
    re-creates its activations in the backward; the checkpoints share `shared_once` (the rotary table)."""
    n_re = recompute.recomputed_layers(layers)
    size = recompute.num_layers if (n_re and recompute.method == "uniform") else 1
    out = []
    for i in range(layers):
        if i < n_re:
            starts = i % size == 0
            stored = (checkpoint_input if starts else 0) + (shared_once if i == 0 else 0)
            # The checkpointed forward runs without saving: its halves live and die like offloaded ones; the
            # backward re-creates the whole layer (the checkpoint input comes back first under offload).
            out.append(Group(f"{prefix}{i}", part, stored, keep_on_device=shared_once if i == 0 else 0,
                             recompute=one, forward_live=forward_live, forward_extra=forward_live,
                             backward_phases=tuple((checkpoint_input, w, freed) for _, w, freed in phases)))
        else:
            out.append(Group(f"{prefix}{i}", part, one, views=one_views, keep_on_device=kept_per_layer,
                             forward_live=forward_live, forward_extra=forward_extra, backward_phases=phases))
    return out


def stage_groups(shape: ModelShape, layout: Layout, work: RankWork, setting: ActivationMemoryConfig, *, stage: int,
                 e: int, kernels: KernelSaves = CPU_KERNELS) -> List[Group]:
    """What one micro-batch's forward keeps on pipeline stage `stage`, in forward order."""
    t = layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    s, h = work.tokens, shape.hidden
    v = shape.vocab // t
    groups: List[Group] = []
    if first:
        groups.append(Group("embedding", "rest", 8 * s, pre=8 * s, workspace=v * h * e + s * h * e))
        if work.frames:
            n = sum(fw.count * fw.patches for fw in work.frames)
            vh = shape.v_hidden
            px = sum(fw.count * 3 * fw.height * fw.width for fw in work.frames)
            groups.append(Group("vision.patch_embed", "rest", px * e, pre=px * e,
                                workspace=n * vh * e * 2))
            vl = vision_layer_saved(shape, layout, work, e, setting.vision)
            vv = vision_layer_saved(shape, layout, work, e, setting.vision, views=True)
            kept = 4 * len(work.frames) if setting.vision.granularity == "selective" else 0
            fv, hp = shape.v_ffn // t, vh // t
            ve = n * e
            # Forward halves alive at once: attention (input, norm output, QKV, SDPA output and its copy) and MLP
            # (input, residual, norm output, FC1 output, GELU output, FC2 output).
            live_v = max(ve * (2 * vh + 5 * hp), ve * (4 * vh + 2 * fv))
            # Backward phases: SDPA's (q, k, v, out, lse back; q, k, v gradients) and FC2's (GELU output back; its
            # input and weight gradients).
            mlp_half_v = vl["norms"] // 2 + vl["linear_inputs"] // 2 + vl["mlp"]
            phases_v = ((ve * 4 * hp + n * 4 * (shape.v_heads // t), ve * (vh + 3 * hp), mlp_half_v),
                        (ve * fv, ve * (vh + fv) + 2 * fv * vh * e, 0))
            groups += _layer_groups("vision.layer", "vision", shape.v_layers_run, sum(vl.values()),
                                    sum(vv.values()), setting.vision, n * vh * e, 0, phases_v, kept, live_v,
                                    ve * vh)
            if shape.v_post_norm:
                groups.append(Group("vision.post_norm", "rest", n * (vh * e + 8), workspace=n * vh * e * 2))
            tok = work.frame_tokens
            groups.append(Group("projector", "rest", tok * (8 * vh * e + 8 + 2 * (h // t) * e),
                                workspace=tok * (4 * vh + 2 * h) * e))
        if work.rows_sent or work.rows_received:
            idx = 8 * (work.rows_sent + work.rows_received)
            groups.append(Group("routing", "rest", idx + work.rows_received * h * e, pre=idx,
                                workspace=(work.rows_sent + work.rows_received) * h * e))
    L = _layers_on_stage(shape, layout)
    ll = llm_layer_saved(shape, layout, work, e, kernels, setting.llm)
    lv = llm_layer_saved(shape, layout, work, e, kernels, setting.llm, views=True)
    f = shape.ffn // t
    S = work.ring_rows
    d = shape.head_dim
    hq, hkv = _heads_per_tp(shape.heads, t), _heads_per_tp(shape.kv_heads, t)
    dr = 2 * d  # cos and sin of one projection
    qkv_out = (hq + 2 * hkv) * d
    # Forward under offload, the attention half at the ring's merge: the layer input, the norm output, the QKV output,
    # q and k after RoPE, the ring's output accumulator, the kernel's block output and the merge's scaled copy, v made
    # contiguous, the current cos/sin, fp32 log-sum-exps; the MLP half: input, residual, norm output, FC1 output, up,
    # SiLU, product, FC2 output.
    attn_live = s * e * (3 * h + qkv_out + hkv * d + dr) + S * d * e * (work.heads_q * 4 + work.heads_kv) \
        + 4 * work.heads_q * S * 4
    mlp_live = s * e * (4 * h + 5 * f)
    live = max(attn_live, mlp_live)
    # Without offload only the ring's kernel output and merge copy are temporaries (the rest is kept anyway).
    extra = 2 * S * work.heads_q * d * e + s * h * e
    # Backward phases. The ring's: its q, k, v, output and lse back (offload), and the fp32 dq, dk, dv accumulators
    # with the kernel's q, k, v gradients (plus, across a ring, the KV block and dK/dV accumulator in flight). FC2's:
    # SiLU's output and the up half back, FC2's input and weight gradients. Both with the layer's output gradient.
    ring_back = (S * d * e * (work.heads_q + 2 * work.heads_kv) if not plain_ring(layout, work)
                 else s * e * (hq * d + 2 * hkv * d)) + S * work.heads_q * d * e + work.heads_q * S * 4
    # The ring backward's buffers: dout, the fp32 dq accumulator and the kernel's dq; per KV block the kernel's dk, dv
    # and the fp32 dk/dv partials, and across a ring also the received KV block, the next one in flight, the
    # accumulators travelling and the ones kept for the own block; the Ulysses all-to-all's gradient copy.
    Sq, Skv = S * work.heads_q * d, S * work.heads_kv * d
    ring_ws = Sq * (3 * e + 4) + Skv * ((8 * e + 24) if layout.ring > 1 else (2 * e + 8))
    if not plain_ring(layout, work):
        ring_ws += Sq * e
    mlp_half = ll["norms"] // 2 + ll["linear_inputs"] // 2 + ll["mlp"]
    # (brought back by offload, working set, bytes of the layer its earlier backward phases already freed)
    phases = ((ring_back, s * h * e + ring_ws, mlp_half),
              (2 * s * f * e, s * h * e + s * f * e + 2 * f * h * e, 0))
    kept = 4 if setting.llm.granularity == "selective" else 0
    rope = _rope_table(work, shape)
    groups += _layer_groups("llm.layer", "llm", L, sum(ll.values()), sum(lv.values()), setting.llm, s * h * e,
                            rope, phases, kept, live, extra)
    if last:
        sn = s // t if layout.sequence_parallel else s
        groups.append(Group("llm.final_norm", "llm", _norm(sn, h, e, kernels), workspace=2 * sn * h * e))
        # Megatron's cross entropy works in fp32 in place (exp, then the gradient in the same storage); in bf16 the
        # fp32 copy of the logits is the one kept, the bf16 logits a forward temporary.
        groups.append(Group("output", "rest", sn * h * e + s * v * 4 + s * 1 + s * 8,
                            workspace=s * h * e + v * h * e, forward_extra=s * v * e if e < 4 else 0))
    return groups


# -------------------------------------------------------------------------------------------------------------
# One rank's activation memory
# -------------------------------------------------------------------------------------------------------------

@dataclass
class RankMemory:
    """Predicted activation memory of one rank for one step (bytes)."""

    saved_bytes: int
    """Kept for the backward on the device side by one micro-batch's forward."""
    saved_parts: Dict[str, int]
    """saved_bytes by part: llm (the LLM's block), vision (the encoder's block), rest; offload_kept."""
    offloaded_bytes: int
    """Moved to host memory by one micro-batch's forward."""
    peak_bytes: int
    """The most allocated at once during the step's forward and backward, above what existed before it."""
    in_flight: int
    """Micro-batches whose activations the stage holds at once."""
    peak_at: str = ""
    """Where the peak happens (forward:<group> or backward:<group>)."""
    timeline: List[Tuple[str, int]] = field(default_factory=list)
    """The predicted live bytes at each group's forward and backward (diagnostics)."""


def _layers_on_stage(shape: ModelShape, layout: Layout) -> int:
    return shape.layers // layout.pp


def predict_rank_memory(shape: ModelShape, layout: Layout, work: RankWork, setting: ActivationMemoryConfig, *,
                        micro_batches: int, stage: int = 0, element_bytes: int = 2,
                        kernels: KernelSaves = CPU_KERNELS) -> RankMemory:
    """Activation memory of one rank (pipeline stage `stage`) for one step of `micro_batches` micro-batches."""
    e = element_bytes
    first, last = stage == 0, stage == layout.pp - 1
    groups = stage_groups(shape, layout, work, setting, stage=stage, e=e, kernels=kernels)
    off = setting.offload
    parts = {"llm": 0, "vision": 0, "rest": 0, "offload_kept": 0}
    offloaded = 0
    device = []  # per group: bytes that stay on the device side and are new in this step
    for g in groups:
        if off and g.part in ("llm", "vision"):
            parts["offload_kept"] += g.keep_on_device
            offloaded += g.moved
            device.append(g.keep_on_device - min(g.pre, g.keep_on_device))
        else:
            parts[g.part] += g.stored
            device.append(g.stored - g.pre)
    saved = sum(parts.values())
    s, h = work.tokens, shape.hidden
    # Alive between forward and backward beside the saved tensors: the stage's output (the schedule keeps it until
    # its backward) and, on later stages, the received input.
    boundary = (0 if last else s * h * e) + (0 if first else s * h * e)
    held = sum(device) + boundary
    in_flight = min(micro_batches, layout.pp - stage)
    base = (in_flight - 1) * held
    peak, at, timeline = 0, "", []
    # The forward, group by group: what earlier groups hold, plus this group's activations alive at once.
    alive = (0 if first else s * h * e)
    for g, dev in zip(groups, device):
        moved = off and g.part in ("llm", "vision")
        here = base + alive + (g.forward_live if moved else dev + g.forward_extra)
        timeline.append((f"forward:{g.name}", here))
        if here > peak:
            peak, at = here, f"forward:{g.name}"
        alive += dev
    # The backward, last group first: what is still held, plus the group's re-created activations, what offload
    # brought back, and its working set.
    alive = held
    for g, dev in zip(reversed(groups), reversed(device)):
        moved = off and g.part in ("llm", "vision")
        phases = g.backward_phases or ((0, g.workspace, 0),)
        own = dev + g.recompute  # this group's activations alive when its backward starts
        here = base + alive - dev + max((back if moved else 0) + ws + max(own - (0 if moved and not g.recompute
                                                                                   else freed), 0)
                                        for back, ws, freed in phases)
        timeline.append((f"backward:{g.name}", here))
        if here > peak:
            peak, at = here, f"backward:{g.name}"
        alive -= dev
    return RankMemory(saved_bytes=saved, saved_parts=parts, offloaded_bytes=offloaded, peak_bytes=peak,
                      in_flight=in_flight, peak_at=at, timeline=timeline)


# -------------------------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state
# -------------------------------------------------------------------------------------------------------------

def llm_layer_params(shape: ModelShape, tp: int) -> int:
    h, d = shape.hidden, shape.head_dim
    hq, hkv = _heads_per_tp(shape.heads, tp), _heads_per_tp(shape.kv_heads, tp)
    qkv = h * (hq + 2 * hkv) * d + ((hq + 2 * hkv) * d if shape.qkv_bias else 0)
    return qkv + hq * d * h + 2 * (shape.ffn // tp) * h + (shape.ffn // tp) * h + 2 * h


def vision_params(shape: ModelShape, tp: int) -> int:
    h, f = shape.v_hidden, shape.v_ffn // tp
    hp = h // tp
    layer = h * 3 * hp + 3 * hp + hp * h + h + h * f + f + f * h + h + 4 * h
    return shape.v_layers * layer + 3 * shape.patch ** 2 * h + h + (shape.image // shape.patch) ** 2 * h + 2 * h


def projector_params(shape: ModelShape, tp: int) -> int:
    c4, H = 4 * shape.v_hidden, shape.hidden
    return 2 * c4 + c4 * (H // tp) + H // tp + (H // tp) * H + H


@dataclass
class StaticMemory:
    """Bytes that exist for the whole run on one rank."""

    params: int
    """Parameter count on the rank (the largest pipeline stage)."""
    weights: int
    """Bytes of the weights in the training dtype."""
    gradients: int
    """Megatron DDP's fp32 gradient buffers."""
    optimizer: int
    """Adam: fp32 moments (and fp32 main weights under bf16), sharded over DP x CP with the distributed optimizer."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def static_memory(shape: ModelShape, layout: Layout, *, param_bytes: int = 2, stage: int = 0) -> StaticMemory:
    """Weights, gradients and optimizer state of pipeline stage `stage` (every parameter trains)."""
    t = layout.tp
    L = _layers_on_stage(shape, layout)
    n = L * llm_layer_params(shape, t)
    emb = (shape.vocab // t) * shape.hidden
    if stage == 0:
        n += emb + vision_params(shape, t) + projector_params(shape, t)
    if stage == layout.pp - 1:
        n += shape.hidden + (0 if shape.tie_embeddings and layout.pp == 1 else emb)
    weights = n * param_bytes
    grads = n * 4
    opt_per = 8 + (4 if param_bytes < 4 else 0)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    return StaticMemory(params=n, weights=weights, gradients=grads, optimizer=n * opt_per // shard)


def ring_buffers(shape: ModelShape, layout: Layout, work: RankWork, e: int) -> int:
    """Ring forward and backward buffers alive at once in one layer (not kept across layers): the KV block in flight,
    and in the backward the fp32 dK/dV accumulators of the held block and of the one in flight, plus dq. For
    reporting: the peak already holds them (the ring phase of a layer's backward)."""
    if layout.ring == 1:
        return 0
    d = shape.head_dim
    kv = work.ring_rows * work.heads_kv * d
    return 2 * kv * e * 2 + 4 * kv * 4 + work.ring_rows * work.heads_q * d * 4


@dataclass
class Workload:
    """What one micro-batch holds (the planner's input)."""

    seq_length: int
    """Tokens per micro-batch (one packed sequence)."""
    frames: int = 0
    """Video frames per micro-batch."""
    frame_px: Optional[int] = None
    """Frame size (default: the encoder's native size)."""
    micro_batches: int = 1
    """Micro-batches per step and DP rank (1F1B holds up to PP of them)."""


def rank_memory_gb(shape: ModelShape, layout: Layout, work: Workload, setting: ActivationMemoryConfig, *,
                   element_bytes: int = 2, kernels: KernelSaves = GPU_KERNELS, workspace_gb: float = 2.0
                   ) -> Dict[str, float]:
    """Everything on the most loaded rank (stage 0 holds the encoder and the most micro-batches), in GiB.

    workspace_gb: the framework's own reserve (CUDA context, NCCL buffers, allocator fragmentation)."""
    rw = even_rank_work(shape, layout, work.seq_length, work.frames, work.frame_px)
    worst = None
    for stage in range(layout.pp):
        act = predict_rank_memory(shape, layout, rw, setting, micro_batches=work.micro_batches, stage=stage,
                                  element_bytes=element_bytes, kernels=kernels)
        st = static_memory(shape, layout, param_bytes=element_bytes, stage=stage)
        ring = ring_buffers(shape, layout, rw, element_bytes)
        total = st.total + act.peak_bytes
        row = {"stage": stage, "weights": st.weights / GiB, "gradients": st.gradients / GiB,
               "optimizer": st.optimizer / GiB, "activations_peak": act.peak_bytes / GiB,
               "activations_saved": act.saved_bytes * act.in_flight / GiB, "offloaded_host": act.offloaded_bytes
               * act.in_flight / GiB, "ring_buffers_in_peak": ring / GiB, "workspace": workspace_gb,
               "total": total / GiB + workspace_gb}
        if worst is None or row["total"] > worst["total"]:
            worst = row
    return worst

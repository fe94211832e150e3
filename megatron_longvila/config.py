"""MM-SP configuration on top of Megatron-Core's own knobs, validated at start-up.

Public API:
    MMSPConfig                                   dataclass: how context parallelism runs in the GPT layers
    MMSPConfigError                              ValueError subclass; every message names the flag to change
    mmsp_config_from_megatron(config, **kw) -> MMSPConfig
        read --context-parallel-size and --hierarchical-context-parallel-sizes U R from a TransformerConfig
    validate_mmsp(config, mmsp=None, *, seq_length=None, micro_batch_size=None, packed=False) -> MMSPConfig
        check every combination before any model is built; raise MMSPConfigError naming the fix

How a Megatron user switches MM-SP on for a plain GPT (the flags they know):
    --context-parallel-size C --hierarchical-context-parallel-sizes U R --cp-comm-type a2a+p2p
    --spec megatron_longvila.models.specs gpt_mmsp        (or gpt_mmsp_local: Megatron's own layers, no TE)
The spec is the switch: `gpt_mmsp` puts MM-SP's core attention in the layer, `gpt_te_cp` keeps Transformer
Engine's own a2a+p2p context parallelism (the baseline, same model otherwise). Both read the same hierarchical
sizes, so `--cp-comm-type a2a+p2p` means "Ulysses over U, ring over R" for either. LongVILA's own training
(training/, examples/pretrain_longvila.py) builds its layers itself and needs no --spec.
Unlike Megatron-Core's TE path, missing or inconsistent hierarchical sizes are an error, never a silent
fallback to plain ring CP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import MMSPConfigError
from .runtime.probes import te_available

__all__ = ["MMSPConfig", "MMSPConfigError", "mmsp_config_from_megatron", "validate_mmsp", "CP_ATTENTION_CHOICES"]

CP_ATTENTION_CHOICES = ("mmsp", "te_a2a_p2p")
_BACKENDS = ("auto", "cpu", "torch_cuda", "te", "te_fp8", "math")


@dataclass(kw_only=True)
class MMSPConfig:
    """How context parallelism runs inside the GPT layers. Build it with `mmsp_config_from_megatron`."""

    ulysses_size: int = 1
    """U: ranks per Ulysses (all-to-all over heads) group; first of --hierarchical-context-parallel-sizes."""
    ring_size: int = 1
    """R: ranks per zigzag ring; second of --hierarchical-context-parallel-sizes."""
    cp_attention: str = "mmsp"
    """"mmsp" (this project's 2D attention) or "te_a2a_p2p" (Transformer Engine's hierarchical CP, baseline)."""
    attention_backend: str = "auto"
    """Local kernel inside the ring: auto, cpu, torch_cuda, te or math (see attention.backends)."""
    ring_first: bool = False
    """Put ring ranks (instead of Ulysses ranks) on consecutive CP ranks."""
    uniform_shards: Optional[bool] = None
    """Pad so every CP rank holds the same number of tokens. None: on exactly when needed (PP > 1 or TP
    sequence parallelism), since pipeline p2p buffers and sequence-parallel scatters need fixed shapes."""
    pad_to_multiple: int = 1
    """With uniform shards, local length is a multiple of this (set to TP under sequence parallelism)."""

    @property
    def cp_size(self) -> int:
        return self.ulysses_size * self.ring_size


def _hier_sizes(config) -> Optional[list]:
    sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
    return None if sizes is None else list(sizes)


def mmsp_config_from_megatron(config, *, cp_attention: str = "mmsp", attention_backend: str = "auto",
                              ring_first: bool = False, uniform_shards: Optional[bool] = None) -> MMSPConfig:
    """Read U and R from a TransformerConfig (or ModelParallelConfig); fill the derived shard settings.

    No checking beyond what is needed to read the sizes: call `validate_mmsp` for that.
    """
    cp = int(getattr(config, "context_parallel_size", 1) or 1)
    sizes = _hier_sizes(config)
    if sizes is None:
        u, r = (1, 1) if cp == 1 else (0, 0)  # 0: "not given", rejected by validate_mmsp when CP > 1
    elif len(sizes) == 2:
        u, r = int(sizes[0]), int(sizes[1])
    else:
        u, r = -1, -1  # wrong arity, rejected by validate_mmsp
    tp = int(getattr(config, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(config, "pipeline_model_parallel_size", 1) or 1)
    sp = bool(getattr(config, "sequence_parallel", False))
    if uniform_shards is None:
        uniform_shards = pp > 1 or sp
    return MMSPConfig(ulysses_size=u, ring_size=r, cp_attention=cp_attention, attention_backend=attention_backend,
                      ring_first=ring_first, uniform_shards=uniform_shards,
                      pad_to_multiple=tp if (sp and uniform_shards) else 1)


def validate_mmsp(config, mmsp: Optional[MMSPConfig] = None, *, seq_length: Optional[int] = None,
                  micro_batch_size: Optional[int] = None, packed: bool = False,
                  te: Optional[bool] = None) -> MMSPConfig:
    """Check a TransformerConfig and MM-SP settings together; return the (filled-in) MMSPConfig.

    Args:
        config: Megatron's TransformerConfig (sizes, heads, sequence_parallel, dropout, fp8 ...).
        mmsp: MM-SP settings; None reads them from `config` (`mmsp_config_from_megatron`).
        seq_length: --seq-length, when the pipeline needs a fixed per-rank shape (PP > 1 or sequence parallelism).
        micro_batch_size: --micro-batch-size, checked against packed sequences.
        packed: whether sequences pack several documents (one plan per micro-batch).
        te: whether Transformer Engine imports where the model runs (None: probe here; a dry run passes the
            target's).

    Raises:
        MMSPConfigError: the first problem found, with the flag to change.
    """
    if mmsp is None:
        mmsp = mmsp_config_from_megatron(config)
    te_ok = te_available() if te is None else te
    cp = int(getattr(config, "context_parallel_size", 1) or 1)
    tp = int(getattr(config, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(config, "pipeline_model_parallel_size", 1) or 1)
    sp = bool(getattr(config, "sequence_parallel", False))
    sizes = _hier_sizes(config)

    if mmsp.cp_attention not in CP_ATTENTION_CHOICES:
        raise MMSPConfigError(f"cp_attention={mmsp.cp_attention!r}: choose one of {CP_ATTENTION_CHOICES} (pick the "
                              f"layer spec: --spec megatron_longvila.models.specs gpt_mmsp or gpt_te_cp)")
    if mmsp.attention_backend not in _BACKENDS:
        raise MMSPConfigError(f"attention_backend={mmsp.attention_backend!r}: choose one of {_BACKENDS}")

    # --- sizes -------------------------------------------------------------------------------------------
    if cp > 1 and sizes is None:
        raise MMSPConfigError(
            f"--context-parallel-size {cp} without --hierarchical-context-parallel-sizes: MM-SP needs the mesh "
            f"explicitly (it never falls back to plain ring CP). Set --hierarchical-context-parallel-sizes U R "
            f"with U*R = {cp}, e.g. '{cp} 1' (Ulysses only) or '1 {cp}' (ring only)")
    if sizes is not None and len(sizes) != 2:
        raise MMSPConfigError(f"--hierarchical-context-parallel-sizes {' '.join(map(str, sizes))}: MM-SP takes exactly "
                              f"two sizes, U (Ulysses, inner) and R (ring, outer)")
    if sizes is not None and any(int(s) < 1 for s in sizes):
        raise MMSPConfigError(f"--hierarchical-context-parallel-sizes {' '.join(map(str, sizes))}: sizes must be >= 1")
    if sizes is not None and (int(sizes[0]) != mmsp.ulysses_size or int(sizes[1]) != mmsp.ring_size):
        raise MMSPConfigError(f"MMSPConfig has U={mmsp.ulysses_size}, R={mmsp.ring_size} but "
                              f"--hierarchical-context-parallel-sizes is {sizes}: build it with "
                              f"mmsp_config_from_megatron(config)")
    if mmsp.ulysses_size * mmsp.ring_size != cp:
        raise MMSPConfigError(
            f"--hierarchical-context-parallel-sizes {mmsp.ulysses_size} {mmsp.ring_size} multiply to "
            f"{mmsp.ulysses_size * mmsp.ring_size}, not --context-parallel-size {cp}: change one so that U*R = CP")
    cp_comm = getattr(config, "cp_comm_type", None)
    comm_types = set(cp_comm) if isinstance(cp_comm, (list, tuple)) else {cp_comm}
    if cp > 1 and not comm_types <= {None, "a2a+p2p"}:
        raise MMSPConfigError(
            f"--cp-comm-type {cp_comm}: MM-SP (and the TE baseline spec) is hierarchical Ulysses x ring; set "
            f"--cp-comm-type a2a+p2p, or use Megatron's own TE layer spec for '{cp_comm}' context parallelism")

    # --- heads after TP, then Ulysses -------------------------------------------------------------------------
    heads = int(config.num_attention_heads)
    groups = int(getattr(config, "num_query_groups", None) or heads)
    if heads % tp:
        raise MMSPConfigError(f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}: "
                              f"TP splits heads first; change one of them")
    if heads % groups:
        raise MMSPConfigError(f"--num-attention-heads {heads} is not a multiple of --num-query-groups {groups}")
    if groups % tp and tp % groups:
        raise MMSPConfigError(f"--num-query-groups {groups} and --tensor-model-parallel-size {tp}: one must divide "
                              f"the other (KV heads are split, or replicated, over TP)")
    heads_tp = heads // tp
    if mmsp.cp_attention == "mmsp" and heads_tp < mmsp.ulysses_size:
        raise MMSPConfigError(
            f"{heads_tp} query heads per tensor-parallel rank (--num-attention-heads {heads} / "
            f"--tensor-model-parallel-size {tp}) cannot be split over Ulysses size {mmsp.ulysses_size}: lower U in "
            f"--hierarchical-context-parallel-sizes (move the factor to R) or lower --tensor-model-parallel-size")
    if mmsp.cp_attention == "te_a2a_p2p" and cp > 1:
        kv_tp = max(groups // tp, 1)
        if heads_tp % mmsp.ulysses_size or kv_tp % mmsp.ulysses_size:
            raise MMSPConfigError(
                f"TE's a2a+p2p needs query heads ({heads_tp}) and KV heads ({kv_tp}) per TP rank divisible by U="
                f"{mmsp.ulysses_size}: lower U in --hierarchical-context-parallel-sizes, or use the gpt_mmsp spec "
                f"(MM-SP splits any head count)")

    # --- attention features MM-SP does not implement -----------------------------------------------------
    if mmsp.cp_attention == "mmsp":
        if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
            raise MMSPConfigError(f"--attention-dropout {config.attention_dropout}: MM-SP attention has no dropout; "
                                  f"set --attention-dropout 0")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise MMSPConfigError("--apply-query-key-layer-scaling is not supported by MM-SP attention; drop the flag")
        if getattr(config, "window_size", None) is not None:
            raise MMSPConfigError("--window-size (sliding-window attention) is not supported by MM-SP attention; "
                                  "drop the flag")
        if getattr(config, "multi_latent_attention", False):
            raise MMSPConfigError("--multi-latent-attention is not supported by the MM-SP layer spec")
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type not in (None, "vanilla"):
            raise MMSPConfigError(f"--softmax-type {softmax_type}: MM-SP attention implements vanilla softmax only")
    fp8_attn = bool(getattr(config, "fp8", None)) and bool(getattr(config, "fp8_dot_product_attention", False))
    if getattr(config, "fp8_dot_product_attention", False) and not getattr(config, "fp8", None):
        raise MMSPConfigError("--fp8-dot-product-attention needs --fp8-format (FP8 training) as well")
    if fp8_attn and not te_ok:
        raise MMSPConfigError("--fp8-dot-product-attention needs Transformer Engine, which does not import here; "
                              "drop the flag or install transformer-engine on a CUDA machine")
    if fp8_attn and mmsp.cp_attention == "mmsp" and mmsp.attention_backend not in ("auto", "te_fp8"):
        # FP8 attention inside the ring is the te_fp8 kernel; another explicit kernel would silently run in 16 bit.
        raise MMSPConfigError(f"--fp8-dot-product-attention runs the ring's blocks with the te_fp8 kernel, but "
                              f"attention_backend={mmsp.attention_backend!r} was set; use 'auto' or 'te_fp8', or drop "
                              f"the flag")
    if mmsp.cp_attention == "te_a2a_p2p" and not te_ok:
        raise MMSPConfigError("the TE a2a+p2p baseline (gpt_te_cp) needs Transformer Engine, which does not import "
                              "here; use --spec megatron_longvila.models.specs gpt_mmsp_local")

    # --- shapes: pipeline, sequence parallelism, packing ------------------------------------------------
    if sp and tp == 1:
        raise MMSPConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1; drop --sequence-parallel")
    needs_uniform = pp > 1 or sp
    if mmsp.cp_attention == "mmsp" and needs_uniform and not mmsp.uniform_shards:
        raise MMSPConfigError(
            "uniform_shards=False with "
            + ("--pipeline-model-parallel-size > 1" if pp > 1 else "--sequence-parallel")
            + ": pipeline buffers and sequence-parallel scatters need equal per-rank lengths; leave uniform_shards "
              "unset (None) or True")
    if mmsp.cp_attention == "mmsp" and sp and mmsp.pad_to_multiple % tp:
        raise MMSPConfigError(f"pad_to_multiple={mmsp.pad_to_multiple} with --sequence-parallel: the local length "
                              f"must divide by --tensor-model-parallel-size {tp}; use a multiple of {tp}")
    if mmsp.pad_to_multiple > 1 and not mmsp.uniform_shards:
        raise MMSPConfigError("pad_to_multiple > 1 needs uniform_shards=True")
    if seq_length is not None and needs_uniform:
        unit = cp * (tp if sp else 1)
        if seq_length % unit:
            raise MMSPConfigError(
                f"--seq-length {seq_length} is not a multiple of --context-parallel-size {cp}"
                + (f" x --tensor-model-parallel-size {tp} (sequence parallelism)" if sp else "")
                + f" = {unit}: with pipeline parallelism or sequence parallelism every rank must hold seq-length/"
                  f"{unit} tokens; change --seq-length")
    if packed and micro_batch_size is not None and micro_batch_size > 1:
        raise MMSPConfigError(f"--micro-batch-size {micro_batch_size} with packed sequences: one sharding plan serves "
                              f"one packed sequence; set --micro-batch-size 1 and pack more documents per sequence")
    if cp > 1 and not getattr(config, "calculate_per_token_loss", False):
        raise MMSPConfigError(
            "--context-parallel-size > 1 without --calculate-per-token-loss: MM-SP shards give CP ranks different "
            "numbers of loss tokens, and only per-token loss scaling makes the loss the exact global token mean; "
            "add --calculate-per-token-loss (LongVILA's training sets it; a plain GPT's forward step uses "
            "megatron_longvila.batch.gpt.loss_func)")
    return mmsp

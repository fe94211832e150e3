"""Megatron's model and kernel flags -> the configs LongVILA builds: one resolution for both trainers and the dry run.

    add_model_flags(parser)                       the flags, with Megatron's names and meanings, on the project loop's
                                                  parser (every default None: "not given")
    given_model_flags(args) -> dict               the model and kernel flags a project-loop command line gave, with
                                                  their values (megatron_flags.model_flags_from_megatron: the same
                                                  under --use-megatron-training)
    resolve_model(args, shape, *, given, cuda, te, shape_source, target_note=None) -> ResolvedModel
    ResolvedModel                                 what to build: Transformer Engine or the local spec, the fields of the
                                                  LLM's, encoder's and projector's TransformerConfig with where each
                                                  came from, the MM-SP kernel, DDP's overlap, notes

Rules (each flag is honoured or refused with its reason; none is parsed and ignored):
- A flag the user gives wins, with Megatron's meaning. A flag not given takes the model's (checkpoint record or
  --llm: shapes, norm epsilon), the recipe's (Qwen2 and Llama train without dropout), and megatron-core's default
  only where neither has one.
- Shape flags (--num-layers, --hidden-size, ...) are accepted when they agree with the model and an error naming
  both values otherwise: the shape comes from the checkpoint record or --llm.
- --transformer-impl transformer_engine builds the LLM, the encoder and the projector from Transformer Engine's
  modules; asked for where TE does not import (a CPU run included) it is an error naming Transformer Engine. Not
  given, it is TE where TE imports on CUDA, else the local spec with one note.
- Fusions that need TE or CUDA are on by default only with TE on CUDA (Megatron's defaults there); a flag that turns
  one on with the local spec or on the CPU is refused. The encoder's and projector's bias-GELU fusion stays off:
  megatron-core fuses only exact GELU in the tanh form, which is neither SigLIP's nor the projector's activation as
  the models compute it.
- FP8 (--fp8-format, its recipe and amax settings, --fp8-dot-product-attention) applies to the LLM's layers, with TE
  on CUDA in bf16; the encoder and the projector stay bf16.
- --attention-backend picks MM-SP's local kernel inside the ring (auto; flash: PyTorch's flash kernels; fused: TE's
  fused attention; unfused and local: plain tensor algebra) and TE's kernel for the encoder with the TE spec.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import ArgumentError

__all__ = ["add_model_flags", "given_model_flags", "resolve_model", "ResolvedModel", "MODEL_FLAGS", "SHAPE_FLAGS",
           "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = {"auto": "auto", "flash": "torch_cuda", "fused": "te", "unfused": "math", "local": "math"}
"""--attention-backend (Megatron's AttnBackend) -> MM-SP's kernel inside the ring (attention.backends)."""

FP32_LOCAL_LIMIT = 4096
"""fp32 on a GPU runs MM-SP's math kernel, which holds [local x local] scores per head: refused above this."""


@dataclass(frozen=True)
class _Flag:
    option: str
    """The command-line option (Megatron's name)."""
    kwargs: dict
    """argparse keyword arguments besides dest and default."""


def _flag(option: str, **kwargs) -> _Flag:
    return _Flag(option, kwargs)


MODEL_FLAGS: Dict[str, _Flag] = {
    "transformer_impl": _flag("--transformer-impl", choices=["local", "transformer_engine"],
                              help="Megatron's: the layers' implementation (default: transformer_engine where it "
                                   "imports on CUDA, else local, with a note)"),
    "attention_backend": _flag("--attention-backend", choices=list(ATTENTION_BACKENDS),
                               help="Megatron's: the attention kernel (MM-SP's kernel inside the ring: auto; flash = "
                                    "PyTorch's flash kernels; fused = Transformer Engine's; unfused/local = math)"),
    "fp8_format": _flag("--fp8-format", choices=["e4m3", "hybrid"],
                        help="Megatron's: FP8 for the LLM's layers (Transformer Engine on CUDA, with --bf16)"),
    "fp8_recipe": _flag("--fp8-recipe", choices=["tensorwise", "delayed", "mxfp8", "blockwise"],
                        help="Megatron's: the FP8 scaling recipe (with --fp8-format)"),
    "fp8_margin": _flag("--fp8-margin", type=int, help="Megatron's: FP8 scaling margin (with --fp8-format)"),
    "fp8_amax_history_len": _flag("--fp8-amax-history-len", type=int,
                                  help="Megatron's: amax history length (with --fp8-format)"),
    "fp8_amax_compute_algo": _flag("--fp8-amax-compute-algo", choices=["most_recent", "max"],
                                   help="Megatron's: how amax is taken from its history (with --fp8-format)"),
    "fp8_dot_product_attention": _flag("--fp8-dot-product-attention", action="store_const", const=True,
                                       help="Megatron's: FP8 attention (MM-SP's ring blocks on TE's FP8 kernel)"),
    "fp8_param_gather": _flag("--fp8-param-gather", action="store_const", const=True,
                              help="Megatron's: keep FP8 weights (refused: not supported by LongVILA's trainers)"),
    "masked_softmax_fusion": _flag("--no-masked-softmax-fusion", action="store_const", const=False,
                                   help="Megatron's: no fused masked softmax"),
    "bias_gelu_fusion": _flag("--no-bias-gelu-fusion", action="store_const", const=False,
                              help="Megatron's: no fused bias-GELU (the encoder's and projector's stay unfused)"),
    "bias_swiglu_fusion": _flag("--no-bias-swiglu-fusion", action="store_const", const=False,
                                help="Megatron's: no fused SwiGLU in the LLM's MLP"),
    "bias_dropout_fusion": _flag("--no-bias-dropout-fusion", action="store_const", const=False,
                                 help="Megatron's: no fused bias-dropout-add"),
    "apply_rope_fusion": _flag("--apply-rope-fusion", action="store_const", const=True,
                               help="Megatron's: fused RoPE (Transformer Engine on CUDA); --no-rope-fusion turns it off"),
    "gradient_accumulation_fusion": _flag("--no-gradient-accumulation-fusion", action="store_const", const=False,
                                          help="Megatron's: no fused weight-gradient accumulation"),
    "persist_layer_norm": _flag("--no-persist-layer-norm", action="store_const", const=False,
                                help="Megatron's: no persistent fused LayerNorm kernel"),
    "cross_entropy_loss_fusion": _flag("--cross-entropy-loss-fusion", action="store_const", const=True,
                                       help="Megatron's: fused vocabulary-parallel cross-entropy (CUDA)"),
    "cross_entropy_fusion_impl": _flag("--cross-entropy-fusion-impl", choices=["native", "te"],
                                       help="Megatron's: the fused cross-entropy's implementation"),
    "init_method_std": _flag("--init-method-std", type=float,
                             help="Megatron's: std of the normal initialization of new weights (default 0.02)"),
    "attention_dropout": _flag("--attention-dropout", type=float,
                               help="Megatron's: attention dropout (MM-SP attention has none: only 0 is accepted)"),
    "hidden_dropout": _flag("--hidden-dropout", type=float,
                            help="Megatron's: dropout after the LLM's attention and MLP (default: the recipe's 0)"),
    "overlap_grad_reduce": _flag("--overlap-grad-reduce", action="store_const", const=True,
                                 help="Megatron's: overlap the data-parallel gradient reduction with the backward"),
    "overlap_param_gather": _flag("--overlap-param-gather", action="store_const", const=True,
                                  help="Megatron's: overlap the distributed optimizer's parameter all-gather with "
                                       "the forward (needs --use-distributed-optimizer)"),
}
"""The model and kernel flags, by argparse dest."""

SHAPE_FLAGS: Dict[str, _Flag] = {
    "num_layers": _flag("--num-layers", type=int),
    "hidden_size": _flag("--hidden-size", type=int),
    "ffn_hidden_size": _flag("--ffn-hidden-size", type=int),
    "num_attention_heads": _flag("--num-attention-heads", type=int),
    "group_query_attention": _flag("--group-query-attention", action="store_const", const=True),
    "num_query_groups": _flag("--num-query-groups", type=int),
    "max_position_embeddings": _flag("--max-position-embeddings", type=int),
    "normalization": _flag("--normalization", choices=["LayerNorm", "RMSNorm"]),
    "norm_epsilon": _flag("--norm-epsilon", type=float),
    "swiglu": _flag("--swiglu", action="store_const", const=True),
    "untie_embeddings_and_output_weights": _flag("--untie-embeddings-and-output-weights", action="store_const",
                                                 const=True),
    "disable_bias_linear": _flag("--disable-bias-linear", action="store_const", const=True),
    "add_qkv_bias": _flag("--add-qkv-bias", action="store_const", const=True),
}
"""Megatron's shape flags: accepted when they agree with the model (checkpoint record or --llm)."""


def add_model_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model and kernel flags (Megatron's names) and the shape flags on the project loop's parser."""
    g = p.add_argument_group("model and kernels (Megatron)")
    for dest, f in MODEL_FLAGS.items():
        g.add_argument(f.option, dest=dest, default=None, **f.kwargs)
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_const", const=False, default=None,
                   help="Megatron's: no fused RoPE")
    g = p.add_argument_group("model shape (Megatron; from the checkpoint record or --llm, checked when given)")
    for dest, f in SHAPE_FLAGS.items():
        g.add_argument(f.option, dest=dest, default=None, **f.kwargs)
    return p


def given_model_flags(args) -> dict:
    """The model, kernel and shape flags a project-loop command line gave (their defaults are None): dest -> value."""
    return {d: getattr(args, d) for d in list(MODEL_FLAGS) + list(SHAPE_FLAGS) if getattr(args, d, None) is not None}


def _option(dest: str) -> str:
    f = MODEL_FLAGS.get(dest) or SHAPE_FLAGS.get(dest)
    return f.option if f else "--" + dest.replace("_", "-")


@dataclass
class ResolvedModel:
    """What a launch builds (see the module docstring)."""

    use_te: bool
    """Transformer Engine's layers (True) or megatron-core's local ones."""
    llm: Dict[str, Any] = field(default_factory=dict)
    """Fields of the LLM's TransformerConfig."""
    vision: Dict[str, Any] = field(default_factory=dict)
    """Fields of the encoder's TransformerConfig."""
    projector: Dict[str, Any] = field(default_factory=dict)
    """Fields of the projector's TransformerConfig."""
    sources: Dict[str, Dict[str, str]] = field(default_factory=lambda: {"llm": {}, "vision": {}, "projector": {}})
    """Per part, per field: where its value came from (a flag, the model, the recipe, a rule, a default)."""
    attention_backend: str = "auto"
    """MM-SP's local kernel inside the ring (attention.backends)."""
    fp8: Optional[Dict[str, Any]] = None
    """The LLM's FP8 settings, or None."""
    ddp: Dict[str, bool] = field(default_factory=dict)
    """DistributedDataParallelConfig fields (overlap of the gradient reduction and of the parameter gather)."""
    notes: List[str] = field(default_factory=list)
    """One line each, said once at start-up."""

    def set(self, parts, name: str, value, source: str) -> None:
        for part in (parts,) if isinstance(parts, str) else parts:
            getattr(self, part)[name] = value
            self.sources[part][name] = source


def resolve_model(args, shape, *, given: dict, cuda: bool, te: bool, shape_source: str,
                  target_note: Optional[str] = None) -> ResolvedModel:
    """Resolve the model and kernel flags (see the module docstring). Raises ArgumentError naming the flag.

    Args:
        args: the parsed arguments (the project loop's, or megatron.training's): precision and parallel sizes.
        shape: the LLM's shape (models.registry.LLMShape) from the checkpoint record or --llm.
        given: the model, kernel and shape flags the command line gave, dest -> value (given_model_flags, or
            megatron_flags.model_flags_from_megatron, which tells Megatron's defaults apart).
        cuda: the run's ranks have CUDA devices (a dry run: the target's).
        te: Transformer Engine imports where the model is built (a dry run: assumed on the target when asked).
        shape_source: where the shape came from, for messages ("--llm qwen2_7b", "checkpoint record of DIR").
        target_note: a dry run's note on what it could not check on the target.
    """
    r = ResolvedModel(use_te=False)
    all_parts = ("llm", "vision", "projector")

    def val(dest):
        return given.get(dest)

    # --- the implementation ----------------------------------------------------------------------------
    impl = val("transformer_impl")
    if impl == "transformer_engine":
        if not cuda:
            raise ArgumentError("--transformer-impl transformer_engine: Transformer Engine needs CUDA, and this run is "
                                "on the CPU (--cpu): use --transformer-impl local")
        if not te:
            raise ArgumentError("--transformer-impl transformer_engine: Transformer Engine (transformer_engine."
                                "pytorch) does not import here; install transformer-engine on this CUDA machine, or "
                                "use --transformer-impl local")
        r.use_te = True
        source = "flag --transformer-impl"
    elif impl == "local":
        source = "flag --transformer-impl"
    else:
        r.use_te = cuda and te
        if r.use_te:
            source = "default: Transformer Engine imports on CUDA"
        else:
            source = "default: " + ("CPU run" if not cuda else "Transformer Engine does not import")
            r.notes.append("--transformer-impl local: " + ("a CPU run builds megatron-core's local layers" if not cuda
                                                           else "Transformer Engine does not import here; building "
                                                                "megatron-core's local layers"))
    r.set(all_parts, "transformer_impl", "transformer_engine" if r.use_te else "local", source)
    fused_ok = r.use_te and cuda  # fusions that need TE or CUDA
    if target_note and r.use_te:
        r.notes.append(target_note)

    # --- fusions -----------------------------------------------------------------------------------------
    why_not = ("the local spec" if cuda else "a CPU run") if not fused_ok else ""

    def fusion(dest, parts, field_name, default_on=True, explicit_on_needs=None):
        v = val(dest)
        if v is None:
            on = default_on and fused_ok
            r.set(parts, field_name, on, "default: Transformer Engine on CUDA" if on else f"default: {why_not or 'off'}")
            return
        if v and not fused_ok:
            raise ArgumentError(f"{_option(dest)}: the fusion needs Transformer Engine on CUDA, and this run builds "
                                f"{why_not}: drop the flag")
        if v and explicit_on_needs == "cuda" and not cuda:
            raise ArgumentError(f"{_option(dest)} needs CUDA: drop the flag on a CPU run")
        option = "--no-rope-fusion" if dest == "apply_rope_fusion" and not v else _option(dest)
        r.set(parts, field_name, bool(v), f"flag {option}")

    fusion("masked_softmax_fusion", all_parts[:2], "masked_softmax_fusion")
    fusion("bias_swiglu_fusion", "llm", "bias_activation_fusion")
    fusion("bias_dropout_fusion", all_parts, "bias_dropout_fusion")
    fusion("apply_rope_fusion", "llm", "apply_rope_fusion")
    fusion("gradient_accumulation_fusion", all_parts, "gradient_accumulation_fusion")
    fusion("persist_layer_norm", all_parts, "persist_layer_norm")
    fusion("cross_entropy_loss_fusion", "llm", "cross_entropy_loss_fusion", default_on=False)
    gelu = val("bias_gelu_fusion")
    r.set(("vision", "projector"), "bias_activation_fusion", False,
          "flag --no-bias-gelu-fusion" if gelu is not None else
          "rule: megatron-core fuses only tanh-GELU with a bias; kept exact")
    impl_ce = val("cross_entropy_fusion_impl")
    if impl_ce is not None:
        if not r.llm.get("cross_entropy_loss_fusion"):
            raise ArgumentError("--cross-entropy-fusion-impl without --cross-entropy-loss-fusion: give both or neither")
        if impl_ce == "te" and not r.use_te:
            raise ArgumentError("--cross-entropy-fusion-impl te needs Transformer Engine: use native")
        r.set("llm", "cross_entropy_fusion_impl", impl_ce, "flag --cross-entropy-fusion-impl")

    # --- FP8 ----------------------------------------------------------------------------------------------
    fmt = val("fp8_format")
    fp8_extras = [d for d in ("fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo")
                  if val(d) is not None]
    if val("fp8_param_gather"):
        raise ArgumentError("--fp8-param-gather: FP8 weights in the distributed optimizer are not supported by "
                            "LongVILA's trainers; drop the flag (FP8 compute stays available with --fp8-format)")
    if fmt is None and fp8_extras:
        raise ArgumentError(f"{_option(fp8_extras[0])} without --fp8-format: give --fp8-format e4m3|hybrid, or drop it")
    if fmt is not None:
        if not r.use_te:
            raise ArgumentError(f"--fp8-format {fmt}: FP8 needs Transformer Engine on CUDA "
                                f"(--transformer-impl transformer_engine), and this run builds {why_not or 'the local spec'}")
        if not getattr(args, "bf16", False):
            raise ArgumentError(f"--fp8-format {fmt}: FP8 training runs on bf16 weights: add --bf16")
        r.set("llm", "fp8", fmt, "flag --fp8-format")
        for d in fp8_extras:
            r.set("llm", d, val(d), f"flag {_option(d)}")
        r.fp8 = {"format": fmt, **{d: val(d) for d in fp8_extras}}
    if val("fp8_dot_product_attention"):
        if fmt is None:
            raise ArgumentError("--fp8-dot-product-attention needs --fp8-format (FP8 training) as well")
        r.set("llm", "fp8_dot_product_attention", True, "flag --fp8-dot-product-attention")
        r.fp8["attention"] = True

    # --- attention kernel ----------------------------------------------------------------------------------
    ab = val("attention_backend")
    if ab is not None:
        kernel = ATTENTION_BACKENDS[ab]
        if kernel in ("torch_cuda", "te") and not cuda:
            raise ArgumentError(f"--attention-backend {ab}: the kernel needs CUDA; a CPU run takes auto (or unfused)")
        if kernel == "te" and not r.use_te:
            raise ArgumentError(f"--attention-backend {ab}: Transformer Engine's fused attention needs "
                                f"--transformer-impl transformer_engine where TE imports")
        if r.fp8 and r.fp8.get("attention") and kernel != "auto":
            raise ArgumentError(f"--attention-backend {ab} with --fp8-dot-product-attention: FP8 attention runs the "
                                f"ring's blocks on TE's FP8 kernel; drop --attention-backend (or use auto)")
        r.attention_backend = kernel
        r.set(all_parts, "attention_backend", ab, "flag --attention-backend")
    if cuda and not getattr(args, "bf16", False) and r.attention_backend == "auto":
        cp = int(getattr(args, "context_parallel_size", 1) or 1)
        local = int(getattr(args, "seq_length", 0) or 0) // cp
        if local > FP32_LOCAL_LIMIT:
            raise ArgumentError(f"fp32 on a GPU: MM-SP's automatic kernel is then plain tensor algebra, which holds "
                                f"every [{local} x {local}] score matrix of a head; give --bf16 (flash and TE kernels), "
                                f"or --attention-backend unfused to ask for it")

    # --- initialization, dropout ---------------------------------------------------------------------------
    std = val("init_method_std")
    r.set(all_parts, "init_method_std", std if std is not None else 0.02,
          "flag --init-method-std" if std is not None else "default: megatron-core's 0.02")
    ad = val("attention_dropout")
    if ad not in (None, 0, 0.0):
        raise ArgumentError(f"--attention-dropout {ad}: MM-SP attention has no dropout; set --attention-dropout 0")
    r.set(all_parts, "attention_dropout", 0.0, "flag --attention-dropout" if ad is not None
          else "recipe: Qwen2, Llama and SigLIP train without dropout")
    hd = val("hidden_dropout")
    r.set("llm", "hidden_dropout", hd if hd is not None else 0.0,
          "flag --hidden-dropout" if hd is not None else "recipe: Qwen2 and Llama train without dropout")

    # --- DDP overlap ----------------------------------------------------------------------------------------
    ogr, opg = bool(val("overlap_grad_reduce")), bool(val("overlap_param_gather"))
    if opg and not getattr(args, "use_distributed_optimizer", False):
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer (it overlaps the optimizer's "
                            "parameter all-gather)")
    r.ddp = {"overlap_grad_reduce": ogr, "overlap_param_gather": opg}

    # --- shape flags: agree with the model, or an error naming both -----------------------------------------
    want = {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
            "ffn_hidden_size": shape.ffn_hidden_size, "num_attention_heads": shape.num_attention_heads,
            "group_query_attention": shape.num_query_groups != shape.num_attention_heads,
            "num_query_groups": shape.num_query_groups, "normalization": "RMSNorm",
            "norm_epsilon": shape.norm_epsilon, "swiglu": True,
            "untie_embeddings_and_output_weights": not shape.tie_embeddings, "disable_bias_linear": True,
            "add_qkv_bias": shape.qkv_bias}
    for dest, expected in want.items():
        v = val(dest)
        if v is None:
            continue
        if (abs(v - expected) > 1e-12 * max(1.0, abs(expected))) if isinstance(expected, float) else v != expected:
            shown = "given" if v is True else v
            raise ArgumentError(f"{_option(dest)} {shown} contradicts the model ({shape_source}: {expected}); the "
                                f"shape comes from the model: drop the flag or change --llm")
    mpe = val("max_position_embeddings")
    if mpe is not None:
        seq = int(getattr(args, "seq_length", 0) or 0)
        if mpe < seq:
            raise ArgumentError(f"--max-position-embeddings {mpe} is below --seq-length {seq}: the rotary table must "
                                f"cover the longest document")
    return r

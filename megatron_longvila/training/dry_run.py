"""A launch checked without a launcher, a device or Transformer Engine: everything a real launch validates for N ranks,
and what it would build.

    dry_run(argv, extra_args_provider=None, *, world_size, gpus_per_node=None, gpu=None) -> dict
    format_report(report) -> str                      the human-readable form

The report (one JSON object with --json) holds:
    mesh               TP, PP, CP = U x R, DP, the ranks per node and the groups that must share one (TP, Ulysses)
    llm_config, vision_config, projector_config
                       each TransformerConfig as built, field -> value (recompute fields included)
    sources            per config, per field: the flag, the model (checkpoint record or --llm), the recipe, a rule,
                       the project's builder, or megatron-core's default
    spec               the layer specs' module classes (Transformer Engine's named, not imported, where TE is absent)
    attention          MM-SP's mesh, the ring's kernel, FP8
    activation_memory  recompute and offload
    tokens_per_step    --global-batch-size x --seq-length
    memory             the memory model's peak per GPU (predicted_gib_per_gpu) next to the GPU's (gpu_gib; None
                       without --gpu), and what it assumes
    notes              what the dry run could not check, and the launch's own start-up notes

A problem a real launch would report, a predicted out-of-memory included, raises its error (ArgumentError and the
other errors marked raised alike), so the script exits non-zero with that message. For a launch on GPUs the configs
and specs are resolved as the target builds them: Transformer Engine is taken to import there (said in the notes),
its module classes are named without importing it, and megatron-core's checks that need TE run on the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
import json
import logging
import os
import warnings
from typing import Callable, Dict, List, Optional

from ..config import mmsp_config_from_megatron, validate_mmsp
from ..data.manifest import parse_line
from ..data.tokenizer import load_tokenizer_for
from ..errors import ArgumentError, DataError
from ..models.offload import activation_memory_from_args
from ..models.projector import mlp_downsample_spec
from ..models.registry import longvila_configs
from ..models.specs import get_gpt_mmsp_layer_spec
from ..models.te_classes import describe_spec
from ..models.vision import norm_impl, vit_layer_spec
from ..parallel.placement import check_groups
from ..plan.frames import tokens_per_frame
from ..planning.memory import (GPU_KERNELS, MEMORY_MARGIN, Layout, ModelShape, Workload, memory_budget_gib,
                               planned_frames, rank_memory_gb)
from ..planning.timing import PROFILES
from ..runtime.probes import te_available
from .arguments import parse_args
from .providers import checkpoint_record, model_settings, resolve_model_record
from .recipes import get_recipe

__all__ = ["dry_run", "format_report"]

TARGET_TE_NOTE = ("Transformer Engine is taken to import on the target (not checked here): its module classes are "
                  "named, not imported, and megatron-core's checks that need it run when the target builds the model")


def _jsonable(value):
    """A TransformerConfig field's value as JSON: dtypes and enums by name, functions by qualified name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return f"functools.partial({_jsonable(value.func)}, {', '.join(f'{k}={v!r}' for k, v in value.keywords.items())})"
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', getattr(value, '__name__', ''))}"
    return str(value)


def _config_fields(cfg, sources: Dict[str, str], *, model_fields, model_source: str, builder: str):
    """(field -> value, field -> source) of a TransformerConfig as built."""
    values, where = {}, {}
    built = getattr(cfg, "_longvila_given", set())
    for f in dataclasses.fields(cfg):
        if not f.init and f.name.startswith("_"):
            continue
        v = getattr(cfg, f.name, None)
        values[f.name] = _jsonable(v)
        if f.name in sources:
            where[f.name] = sources[f.name]
        elif f.name in model_fields:
            where[f.name] = model_source
        elif f.name.startswith("recompute_"):
            where[f.name] = "flags --recompute-* / --vision-recompute-* (or their default: off)"
        elif f.name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                        "hierarchical_context_parallel_sizes"):
            where[f.name] = "flag --" + f.name.replace("_", "-").replace("hierarchical-context-parallel-sizes",
                                                                          "hierarchical-context-parallel-sizes")
        elif f.name in ("params_dtype", "pipeline_dtype"):
            where[f.name] = "flag --bf16 (else fp32)"
        else:
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            same = default is not dataclasses.MISSING and _jsonable(default) == values[f.name]
            where[f.name] = ("default: megatron-core" if same else f"builder: {builder}" if f.name in built
                             else "derived: megatron-core, from the fields above")
    return values, where


LLM_MODEL_FIELDS = {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "layernorm_epsilon", "normalization", "gated_linear_unit", "activation_func", "add_bias_linear",
                    "add_qkv_bias", "kv_channels"}
VISION_MODEL_FIELDS = {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
                       "layernorm_epsilon", "normalization", "add_bias_linear", "add_qkv_bias", "gated_linear_unit",
                       "activation_func"}


def _layout_groups(world: int, tp: int, cp: int, u: int, pp: int, dp: int):
    """Megatron's rank order (TP fastest, then CP with the Ulysses level inner, then DP, then PP): the TP groups and
    the Ulysses groups as lists of global ranks."""
    def rank(t, c, d, p):
        return t + tp * (c + cp * (d + dp * p))

    tp_groups = [[rank(t, c, d, p) for t in range(tp)] for p in range(pp) for d in range(dp) for c in range(cp)]
    uly_groups = [[rank(t, r * u + k, d, p) for k in range(u)]
                  for p in range(pp) for d in range(dp) for r in range(cp // u) for t in range(tp)]
    return tp_groups, uly_groups


def _check_manifest(path: str, flag: str) -> dict:
    """The manifest exists and parses (a line that does not is a counted skip at training time, not an error)."""
    if not os.path.isfile(path):
        raise ArgumentError(f"{flag} {path} does not exist: give a JSON Lines manifest (see tools/make_manifest.py)")
    good = bad = 0
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f):
                if not raw.strip():
                    continue
                try:
                    parse_line(raw, base, i + 1)
                    good += 1
                except DataError:
                    bad += 1
    except OSError as e:
        raise ArgumentError(f"{flag} {path} cannot be read: {e}") from None
    if good == 0:
        raise ArgumentError(f"{flag} {path} holds no sample in the manifest format ({bad} malformed lines)")
    return {"path": path, "samples": good, "malformed_lines": bad}


@contextlib.contextmanager
def _quiet(captured: List[str]):
    """Keep the dry run's output to its report: what libraries print or log while the configs are built is kept as
    notes (file-descriptor level, so C libraries' prints are kept too)."""
    import sys
    import tempfile

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    root = logging.getLogger()
    root.addHandler(handler)
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp, warnings.catch_warnings(record=True) as caught:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            root.removeHandler(handler)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace") + logs.getvalue()
            captured.extend(line for line in text.splitlines() if line.strip())
            captured.extend(str(w.message) for w in caught)


def dry_run(argv: List[str], extra_args_provider: Optional[Callable] = None, *, world_size: int,
            gpus_per_node: Optional[int] = None, gpu: Optional[str] = None) -> dict:
    """Validate a launch of `argv` on `world_size` ranks and resolve what it builds (see the module docstring)."""
    if world_size < 1:
        raise ArgumentError(f"--world-size {world_size}: give the number of ranks the launch starts")
    if gpu is not None and gpu not in PROFILES:
        raise ArgumentError(f"--gpu {gpu}: one of {sorted(PROFILES)}")
    gpn = gpus_per_node or min(world_size, 8)
    if gpn < 1:
        raise ArgumentError(f"--gpus-per-node {gpn}: give at least 1")
    args = parse_args(argv, extra_args_provider, world_size=world_size)
    data = _check_manifest(args.data_path, "--data-path")
    valid = _check_manifest(args.valid_data_path, "--valid-data-path") if args.valid_data_path else None
    cuda = not args.cpu
    te = te_available() if not cuda else True
    notes: List[str] = []
    captured: List[str] = []
    with _quiet(captured):
        record0 = checkpoint_record(args)
        tokenizer = load_tokenizer_for(args.tokenizer_model, record0)
        record = resolve_model_record(args, tokenizer)
        resolved, kwargs = model_settings(args, record, cuda=cuda, te=te,
                                          target_note=TARGET_TE_NOTE if cuda else None)
        configs = longvila_configs(**kwargs, use_cpu_initialization=not cuda, describe=True)
        mmsp = mmsp_config_from_megatron(configs.llm, attention_backend=resolved.attention_backend)
        validate_mmsp(configs.llm, mmsp, seq_length=args.seq_length, packed=True, te=te)
    notes.extend(resolved.notes)
    notes.extend(f"(start-up) {line}" for line in captured)

    # --- the mesh, and which ranks must share a node --------------------------------------------------------------
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    u, r = (args.hierarchical_context_parallel_sizes or [1, 1])
    dp = world_size // (tp * pp * cp)
    tp_groups, uly_groups = _layout_groups(world_size, tp, cp, u, pp, dp)
    nodes = [f"node{k // gpn}" for k in range(world_size)]
    bad = check_groups(nodes, {"tensor-parallel": tp_groups, "Ulysses": uly_groups if u > 1 else []})
    if bad:
        raise ArgumentError("; ".join(bad[:3]) + f": TP and Ulysses need NVLink inside a node ({gpn} ranks per node, "
                            f"--gpus-per-node); make --tensor-model-parallel-size x U of "
                            f"--hierarchical-context-parallel-sizes U R divide the ranks per node")
    mesh = {"world_size": world_size, "tp": tp, "pp": pp, "cp": cp, "ulysses": u, "ring": r, "dp": dp,
            "gpus_per_node": gpn, "nodes": -(-world_size // gpn), "ranks_of_node0": list(range(min(gpn, world_size))),
            "tp_group_of_rank0": tp_groups[0], "ulysses_group_of_rank0": uly_groups[0] if u > 1 else [0],
            "tp_and_ulysses_groups_inside_one_node": True, "sequence_parallel": bool(args.sequence_parallel),
            "distributed_optimizer": bool(args.use_distributed_optimizer)}

    # --- configs with their sources -----------------------------------------------------------------------------
    names = record.registry_names or {}
    llm_src = f"model: --llm {names['llm']}" if names.get("llm") else "model: the checkpoint's record"
    vis_src = f"model: --vision-encoder {names['vision']}" if names.get("vision") else "model: the checkpoint's record"
    llm_cfg, llm_where = _config_fields(configs.llm, resolved.sources["llm"], model_fields=LLM_MODEL_FIELDS,
                                        model_source=llm_src, builder="models.registry.llm_transformer_config")
    vis_cfg, vis_where = _config_fields(configs.vision_config, resolved.sources["vision"],
                                        model_fields=VISION_MODEL_FIELDS, model_source=vis_src,
                                        builder="models.vision.vision_transformer_config")
    proj_cfg, proj_where = _config_fields(configs.projector, resolved.sources["projector"],
                                          model_fields={"hidden_size", "ffn_hidden_size", "layernorm_epsilon"},
                                          model_source="model: the projector follows the LLM's width",
                                          builder="models.projector.projector_transformer_config")

    # --- specs -------------------------------------------------------------------------------------------------
    backend = "te" if resolved.use_te else "local"
    spec = {"transformer_impl": "transformer_engine" if resolved.use_te else "local",
            "llm_layer": describe_spec(get_gpt_mmsp_layer_spec(backend, describe=True)),
            "vision_layer": describe_spec(vit_layer_spec(resolved.use_te, describe=True)),
            "vision_post_norm": describe_spec(norm_impl(resolved.use_te, describe=True))["module"],
            "projector": describe_spec(mlp_downsample_spec(resolved.use_te, describe=True))}

    # --- attention, memory ---------------------------------------------------------------------------------------
    fp8_attention = bool(resolved.fp8 and resolved.fp8.get("attention"))
    attention = {"cp_attention": "mmsp", "ulysses": u, "ring": r,
                 "kernel": "te_fp8" if fp8_attention else resolved.attention_backend,
                 "fp8": resolved.fp8, "cp_comm_type": configs.llm.cp_comm_type}
    memory_cfg = activation_memory_from_args(args)
    shape = ModelShape.from_configs(configs.llm_shape, configs.vision)
    px = configs.vision.image_size
    tpf = tokens_per_frame(px, px, configs.vision.patch_size)
    media = get_recipe(args.recipe).media
    frames = planned_frames(args.seq_length, tpf, media)
    micro = args.global_batch_size // (args.micro_batch_size * dp)
    layout = Layout(tp=tp, pp=pp, ulysses=u, ring=r, dp=dp, sequence_parallel=bool(args.sequence_parallel),
                    distributed_optimizer=bool(args.use_distributed_optimizer))
    predicted = rank_memory_gb(shape, layout, Workload(seq_length=args.seq_length, frames=frames, micro_batches=micro),
                               memory_cfg, element_bytes=2 if args.bf16 else 4, kernels=GPU_KERNELS)
    gpu_gib = PROFILES[gpu].memory_gb if gpu else None
    budget = memory_budget_gib(gpu_gib) if gpu else None
    memory = {"predicted_gib_per_gpu": round(predicted["total"], 2), "gpu_gib": gpu_gib, "gpu": gpu,
              "budget_gib": None if budget is None else round(budget, 2), "margin": MEMORY_MARGIN,
              "breakdown_gib": {k: round(v, 3) for k, v in predicted.items() if isinstance(v, float)},
              "assumes": (f"video fills 90% of every sequence ({frames} frames of {tpf} tokens)" if media else
                          "text only (the recipe's data)") + f", {micro} micro-batches per step on each data-parallel "
                         f"rank, every parameter training, the memory model of planning.memory (as tools/plan_mesh.py)",
              "fits": None if gpu_gib is None else predicted["total"] <= budget}
    if gpu_gib is not None and predicted["total"] > budget:
        raise ArgumentError(
            f"predicted {predicted['total']:.1f} GiB per GPU, more than {budget:.1f} of the {gpu}'s {gpu_gib:g} GiB "
            f"(a plan keeps {MEMORY_MARGIN:.0%} free): add recompute "
            f"(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1), "
            f"--cpu-offload-activations, --use-distributed-optimizer or more ranks (tools/plan_mesh.py --gpu {gpu} "
            f"finds a layout that fits)")
    if gpu_gib is None:
        notes.append("no --gpu: the memory figure has no verdict")
    return {"launch": {"world_size": world_size, "recipe": args.recipe, "device": "cpu" if args.cpu else "cuda"},
            "mesh": mesh, "llm_config": llm_cfg, "vision_config": vis_cfg, "projector_config": proj_cfg,
            "sources": {"llm": llm_where, "vision": vis_where, "projector": proj_where},
            "spec": spec, "attention": attention,
            "activation_memory": {"label": memory_cfg.label, "flags": memory_cfg.flags(),
                                  "llm": dataclasses.asdict(memory_cfg.llm),
                                  "vision": dataclasses.asdict(memory_cfg.vision), "offload": memory_cfg.offload},
            "ddp": resolved.ddp, "tokens_per_step": args.global_batch_size * args.seq_length,
            "data": {"train": data, "valid": valid}, "memory": memory, "notes": notes}


def format_report(rep: dict) -> str:
    """The dry run's report for a person: the mesh, the model as built, the kernels, memory, notes."""
    m, a, mem = rep["mesh"], rep["attention"], rep["memory"]
    llm = rep["llm_config"]
    lines = [
        f"dry run of a {rep['launch']['recipe']} launch on {m['world_size']} ranks ({rep['launch']['device']}): "
        f"TP {m['tp']} x PP {m['pp']} x CP {m['cp']} (Ulysses {m['ulysses']} x ring {m['ring']}) x DP {m['dp']}, "
        f"{m['gpus_per_node']} ranks per node, {m['nodes']} node(s); TP and Ulysses groups inside one node",
        f"LLM: {llm['num_layers']} layers, hidden {llm['hidden_size']}, {llm['num_attention_heads']} heads "
        f"({llm['num_query_groups']} KV groups), {rep['spec']['transformer_impl']} layers, params "
        f"{llm['params_dtype']}, fp8 {llm.get('fp8')}",
        f"attention: MM-SP {a['ulysses']}x{a['ring']}, kernel {a['kernel']}, fp8 {a['fp8']}",
        f"activation memory: {rep['activation_memory']['label']}; DDP overlap: {rep['ddp']}",
        f"tokens per step: {rep['tokens_per_step']:,}; data: {rep['data']['train']['samples']} samples",
        f"memory: predicted {mem['predicted_gib_per_gpu']:.1f} GiB per GPU"
        + (f" of the {mem['gpu']}'s {mem['gpu_gib']:g} GiB (plans take up to {mem['budget_gib']:g}): fits"
           if mem["gpu_gib"] else ""),
        "values that are not megatron-core's defaults, and where they came from:",
    ]
    for part in ("llm", "vision", "projector"):
        cfg = rep[f"{part}_config"]
        for name, src in sorted(rep["sources"][part].items()):
            if src != "default: megatron-core":
                lines.append(f"  {part}.{name} = {json.dumps(cfg[name])}  ({src})")
    lines.append("layer spec (LLM): " + ", ".join(f"{k}={v.rsplit('.', 1)[-1]}"
                                                   for k, v in rep["spec"]["llm_layer"].items()))
    lines.extend(f"note: {n}" for n in rep["notes"])
    return "\n".join(lines)

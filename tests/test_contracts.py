"""The public contracts: names, import paths, signatures and behaviours other code and acceptance checks rely on
(docs/ARCHITECTURE.md lists them), and every command-line tool answering --help."""

import inspect
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))


def test_attention_and_plan_signatures():
    from megatron_longvila.attention import mmsp_attention
    from megatron_longvila.parallel.mesh import MMSPMesh, build_mmsp_mesh
    from megatron_longvila.parallel.sharding import SequencePlan, plan_sequence

    p = inspect.signature(build_mmsp_mesh).parameters
    assert list(p)[:3] == ["ulysses_size", "ring_size", "cp_group"] and p["cp_group"].default is None
    assert list(inspect.signature(plan_sequence).parameters)[:2] == ["mesh", "seq_lens"]
    a = inspect.signature(mmsp_attention).parameters
    assert list(a)[:4] == ["q", "k", "v", "plan"]
    assert a["causal"].default is True and a["softmax_scale"].default is None and a["backend"].default == "auto"
    for name in ("ulysses_group", "ring_group", "ulysses_size", "ring_size", "cp_size", "cp_rank"):
        assert hasattr(MMSPMesh, name) or name in MMSPMesh.__dataclass_fields__
    for name in ("shard", "gather"):
        assert list(inspect.signature(getattr(SequencePlan, name)).parameters)[2] == "seq_dim"


def test_inference_and_loading_signatures():
    from megatron_longvila.inference import EmbeddingPrompt, generate, score

    g = inspect.signature(generate).parameters
    assert list(g)[:3] == ["model", "prompts", "mesh"]
    assert g["max_new_tokens"].kind is inspect.Parameter.KEYWORD_ONLY and g["max_new_tokens"].default is inspect._empty
    assert (g["temperature"].default, g["top_k"].default, g["top_p"].default, g["eos_id"].default, g["seed"].default) \
        == (0.0, 0, 1.0, None, 0)
    assert list(inspect.signature(score).parameters)[:4] == ["model", "prompts", "answers", "mesh"]
    assert {"input_ids", "visual_positions", "visual_rows"} <= set(EmbeddingPrompt.__dataclass_fields__)

    import torch

    from megatron_longvila.conversion import load_longvila

    lp = inspect.signature(load_longvila).parameters
    assert list(lp)[0] == "path" and lp["params_dtype"].kind is inspect.Parameter.KEYWORD_ONLY
    assert lp["params_dtype"].default is torch.float32


BUILD_LONGVILA_KEYWORDS = [
    "encoder", "projector", "llm", "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "hierarchical_context_parallel_sizes", "params_dtype", "use_te", "layer_spec", "pre_process", "post_process",
    "media_token_id", "locality_aware", "llm_overrides", "real_vocab_size", "activation_memory"]


def test_documented_names_import_at_their_paths():
    """Each documented name at its documented path (a moved name keeps working there by a re-export from a folder
    below it)."""
    from megatron_longvila.attention import mmsp_attention  # noqa: F401
    from megatron_longvila.conversion import load_longvila  # noqa: F401
    from megatron_longvila.inference import generate  # noqa: F401
    from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch
    from megatron_longvila.models.registry import build_longvila  # noqa: F401
    from megatron_longvila.parallel.mesh import build_mmsp_mesh  # noqa: F401
    from megatron_longvila.parallel.sharding import plan_sequence  # noqa: F401
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    assert IGNORE_INDEX == -100
    assert callable(MicroBatch.from_samples)
    assert {"input_ids", "labels", "media", "loss_weight"} <= set(LongVILASample.__dataclass_fields__)
    assert {"token_positions", "frames", "frame_size"} <= set(Media.__dataclass_fields__)
    assert list(inspect.signature(enable_cpu_runtime).parameters) == []


def test_build_longvila_keywords():
    """build_longvila keeps its keyword arguments (new ones may follow them), all keyword-only."""
    from megatron_longvila.models.registry import build_longvila

    params = inspect.signature(build_longvila).parameters
    assert list(params)[:len(BUILD_LONGVILA_KEYWORDS)] == BUILD_LONGVILA_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def _forward_rank(rank, world):
    """One process: a tiny LongVILA from build_longvila, a MicroBatch of a video and a text sample through forward."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch
    from megatron_longvila.models.registry import build_longvila
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_longvila(encoder="siglip_tiny", llm="tiny", media_token_id=5)
    g = torch.Generator().manual_seed(0)
    tpf = 4  # 56 px / 14 px patches = 4x4, downsampled 2x2 -> 4 tokens per frame
    ids = torch.tensor([9, 10] + [5] * (2 * tpf) + [11, 12, 13])
    labels = ids.clone()
    labels[:2 + 2 * tpf] = IGNORE_INDEX
    video = LongVILASample(input_ids=ids, labels=labels, media=[Media(
        token_positions=torch.arange(2, 2 + 2 * tpf).view(2, tpf), frames=torch.randn(2, 3, 56, 56, generator=g))])
    text = torch.tensor([20, 21, 22, 23, 24])
    mb = MicroBatch.from_samples([video, LongVILASample(input_ids=text, labels=text.clone(), loss_weight=0.5)])
    ce, w = model(mb, single_rank_mesh(), reduction="none")
    mean = model(mb, single_rank_mesh())
    return ce.shape, w.shape, float((ce * w).sum() / w.sum()), float(mean), float(w.sum()), mb.total_len


def test_microbatch_through_forward():
    """LongVILAModel.forward takes an unplanned MicroBatch and a mesh: per-token losses with reduction="none", and
    their weighted mean by default."""
    from megatron_longvila.parallel.launch import run_distributed

    ce_shape, w_shape, weighted, mean, wsum, total = run_distributed(_forward_rank, 1)[0]
    assert tuple(ce_shape) == tuple(w_shape) == (1, total)
    # Learned targets (shifted inside each document): the video's 3 answer tokens at weight 1, the text's 4 next
    # tokens at weight 0.5; neither document's last position learns anything.
    assert wsum == 3 + 4 * 0.5
    assert abs(weighted - mean) < 1e-6 * max(1.0, abs(mean))


EXAMPLES = ["pretrain_longvila.py", "generate_longvila.py", "vniah_demo.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_help(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help(tool):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()

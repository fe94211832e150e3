"""The public contracts of DESIGN.md: names and signatures other code and acceptance checks rely on, and
every command-line tool answering --help."""

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

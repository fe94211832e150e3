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


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help(tool):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()

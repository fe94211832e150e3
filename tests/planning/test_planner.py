"""The mesh planner answers for 8, 64, 256 and 1,024 GPUs with NVLink domains of 8 (H100) and 72 (GB200 NVL72), and
every answer obeys its own rules; the time model's attention bytes are the project's counted minimum."""

import json
import os
import subprocess
import sys

import pytest

from megatron_longvila.models.registry import ENCODERS, LLMS
from megatron_longvila.planning.memory import Layout, ModelShape, even_rank_work
from megatron_longvila.planning.mesh import Cluster, plan_mesh
from megatron_longvila.planning.timing import PROFILES, attention_comm_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = {"memory", "divisibility", "Ulysses above the query heads", "crosses the NVLink domain"}


@pytest.mark.parametrize("gpus", [8, 64, 256, 1024])
@pytest.mark.parametrize("domain", [8, 72])
def test_plans_for_clusters(gpus, domain):
    shape = ModelShape.from_names("qwen2_7b", "siglip_so400m_patch14_384")
    gpu = "gb200" if domain == 72 else "h100"
    cluster = Cluster(gpus=gpus, gpus_per_domain=domain, gpu_memory_gb=PROFILES[gpu].memory_gb,
                      profile=PROFILES[gpu])
    seq = 262_144
    plans, infeasible = plan_mesh(shape, cluster, seq, frames=500)
    assert plans, infeasible[:5]
    times = [p.step_time_s for p in plans]
    assert times == sorted(times)
    for p in plans:
        assert p.tp * p.ulysses * p.ring * p.pp * p.dp == gpus
        assert p.memory_gb <= cluster.gpu_memory_gb
        assert domain % (p.tp * p.ulysses) == 0 and p.ulysses <= shape.heads // p.tp
        assert seq % (p.tp * p.ulysses * p.ring) == 0 and shape.layers % p.pp == 0
        f = p.flags
        assert f[f.index("--hierarchical-context-parallel-sizes") + 1:][:2] == [str(p.ulysses), str(p.ring)]
    assert {x["kind"] for x in infeasible} <= KINDS
    for x in infeasible:
        lay = x["layout"]
        if x["kind"] == "Ulysses above the query heads":
            assert lay["ulysses"] > shape.heads // lay["tp"]
        if x["kind"] == "crosses the NVLink domain":
            assert domain % (lay["tp"] * lay["ulysses"]) != 0
    # Every layout is accounted for, exactly once.
    seen = [(p.tp, p.ulysses, p.ring, p.pp, p.dp) for p in plans] + \
        [tuple(x["layout"][k] for k in ("tp", "ulysses", "ring", "pp", "dp")) for x in infeasible]
    assert len(seen) == len(set(seen))


def test_reasons_and_uneven_heads():
    shape = ModelShape.from_names("qwen2_7b", "siglip_so400m_patch14_384")  # 28 query heads, 4 KV heads
    tight = Cluster(gpus=64, gpus_per_domain=8, gpu_memory_gb=20, profile=PROFILES["h100"])
    plans, infeasible = plan_mesh(shape, tight, 131_072, frames=0)
    kinds = {x["kind"] for x in infeasible}
    assert {"memory", "crosses the NVLink domain", "Ulysses above the query heads"} <= kinds
    roomy = Cluster(gpus=64, gpus_per_domain=64, gpu_memory_gb=1000, profile=PROFILES["h100"])
    plans, infeasible = plan_mesh(shape, roomy, 131_072, frames=0)
    # 28 heads over U=8 split 4,4,4,4,3,3,3,3: allowed, at a cost
    uneven = [p for p in plans if p.tp == 1 and p.ulysses == 8]
    assert uneven and all(abs(p.head_imbalance - 4 / 3.5) < 1e-9 for p in uneven)
    even = [p for p in plans if p.tp == 1 and p.ulysses == 4 and p.ring == 16 and p.pp == 1]
    assert even and even[0].head_imbalance == 1.0


def test_attention_bytes_are_the_counted_minimum():
    """The planner's per-rank MM-SP bytes equal attention/cost.py's minimum (which tools/bench_attention.py measures
    equal to comm.py's counters) for even plans, GQA and uneven heads included."""
    from megatron_longvila.attention.cost import comm_bytes_min
    from megatron_longvila.parallel.mesh import MMSPMesh
    from megatron_longvila.parallel.sharding import plan_sequence

    for llm, U, R in (("llama3_8b", 4, 2), ("qwen2_7b", 8, 2), ("qwen2_7b", 2, 4), ("llama3_8b", 1, 4)):
        shape = ModelShape.from_configs(LLMS[llm], ENCODERS["siglip_tiny"])
        lay = Layout(ulysses=U, ring=R)
        T = 1024 * U * R
        mesh = MMSPMesh(ulysses_group=None, ring_group=None, cp_group=None, ulysses_size=U, ring_size=R, cp_rank=0,
                        ulysses_rank=0, ring_rank=0)
        plan = plan_sequence(mesh, [T])
        want = comm_bytes_min(plan, 1, shape.heads, shape.kv_heads, shape.head_dim, 2)[0]
        got = attention_comm_bytes(shape, lay, even_rank_work(shape, lay, T, 0), 2)
        assert got["ulysses"] == want["ulysses"] and got["ring"] == want["ring"], (llm, U, R, got, want)


def test_plan_mesh_cli_reads_a_checkpoint_record(tmp_path):
    from megatron_longvila.models.record import record_of, write_model_record

    it = tmp_path / "iter_0000010"
    it.mkdir()
    write_model_record(str(it), record_of(LLMS["llama3_8b"], ENCODERS["siglip_so400m_patch14_384"],
                                          real_vocab_size=128256))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    for model in (str(it), str(tmp_path)):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_mesh.py"), "--model", model,
                            "--seq-length", "131072", "--gpus", "64", "--gpus-per-domain", "8", "--gpu-memory-gb",
                            "80", "--gpu", "h100", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert out["plans"] and "checkpoint" in out["model"]
        best = out["plans"][0]
        for k in ("tp", "ulysses", "ring", "pp", "dp", "recompute", "offload", "memory_gb", "step_time_s", "flags"):
            assert k in best
        assert all({"layout", "reason"} <= set(x) for x in out["infeasible"])
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_mesh.py"), "--model", str(tmp_path / "x"),
                          "--seq-length", "8", "--gpus", "8", "--gpus-per-domain", "8", "--gpu-memory-gb", "80"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--model" in bad.stderr

"""The multi-node Slurm launch, end to end on one machine: examples/slurm/simulate.sh gives train_longvila.sbatch the
environment of a 2-node allocation, stand-ins for srun and scontrol that start each node's command here, and
torchrun's c10d rendezvous on the loopback address; 2 nodes x 2 CPU ranks, Ulysses inside a node and the ring across
(the sbatch's defaults), fp32 through the sbatch's precision switch.

It trains 2 iterations and saves; a second launch resumes and trains 2 more; a straight 4-iteration launch (the same
learning-rate schedule) gives the same losses (exact resume across launches). Which ranks share a node is checked by the run itself at start-up
(parallel.placement: every rank reports the node srun started it on, and the actual Ulysses groups must each lie
inside one node); a launch whose Ulysses groups would span the two nodes is refused naming the flag.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from .example_script import load_example_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM = os.path.join(ROOT, "examples", "slurm", "simulate.sh")

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_example_script().write_demo_dataset(str(tmp_path_factory.mktemp("sim_data")), num_videos=8,
                                                    frames=8, size=56)


def _launch(cwd, manifest, ckpt, iters, metrics, env_extra=None, timeout=240):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    env.update(env_extra or {})
    args = ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny", "--seq-length", "256",
            "--global-batch-size", "2", "--train-iters", str(iters), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "1", "--lr-decay-iters", "4", "--num-frames", "4", "--data-path", manifest, "--save", ckpt, "--load", ckpt,
            "--save-interval", "2", "--seed", "3", "--metrics-file", metrics]
    return subprocess.run(["bash", SIM] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(path):
    with open(path) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f)}


def _placement(out: str):
    m = re.search(r"sim01: LongVILA node placement: (.*)", out)
    assert m, out[-3000:]
    nodes = {n: json.loads(r) for n, r in re.findall(r"(sim\d+): ranks (\[[^\]]*\])", m.group(1))}
    uly = json.loads(re.search(r"Ulysses groups (\[\[.*?\]\])", m.group(1)).group(1))
    return nodes, uly


def test_two_node_launch_trains_saves_and_resumes(tmp_path, manifest):
    ckpt = str(tmp_path / "ckpt")
    first = _launch(tmp_path, manifest, ckpt, 2, str(tmp_path / "m1.jsonl"))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = first.stdout
    # Each node's torchrun ran (srun's stand-in prefixes output by node), and the ranks really split 2 + 2.
    assert "sim01: " in out and "sim02: " in out
    nodes, uly = _placement(out)
    assert sorted(map(tuple, nodes.values())) == [(0, 1), (2, 3)]
    node_of = {r: n for n, ranks in nodes.items() for r in ranks}
    assert len(uly) == 2 and all(len({node_of[r] for r in g}) == 1 for g in uly)  # Ulysses inside a node
    assert "CP 4 [2, 2]" in out  # the sbatch's defaults: U = ranks per node, R = nodes
    assert os.path.isdir(os.path.join(ckpt, "iter_0000002"))

    second = _launch(tmp_path, manifest, ckpt, 4, str(tmp_path / "m2.jsonl"))
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "loaded iteration 2" in second.stdout
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004"))
    resumed = {**_losses(tmp_path / "m1.jsonl"), **_losses(tmp_path / "m2.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4]

    straight = _launch(tmp_path, manifest, str(tmp_path / "ckpt_straight"), 4, str(tmp_path / "m3.jsonl"))
    assert straight.returncode == 0, straight.stdout[-4000:] + straight.stderr[-4000:]
    assert _losses(tmp_path / "m3.jsonl") == resumed  # fp32 on CPU: resume across launches is bitwise


def test_ulysses_across_nodes_is_refused(tmp_path, manifest):
    """U = 4 on nodes of 2 ranks would put every Ulysses all-to-all across the network: refused at start-up."""
    r = _launch(tmp_path, manifest, str(tmp_path / "ckpt"), 1, str(tmp_path / "m.jsonl"),
                env_extra={"U": "4", "R": "1"}, timeout=180)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "PlacementError" in text and "spans nodes ['sim01', 'sim02']" in text, text[-3000:]
    assert "--hierarchical-context-parallel-sizes" in text


def test_check_groups_is_pure():
    from megatron_longvila.parallel.placement import check_groups

    nodes = ["a", "a", "b", "b"]
    assert check_groups(nodes, {"Ulysses": [[0, 1], [2, 3]]}) == []
    assert check_groups(nodes, {"Ulysses": [[1, 2]]}) == ["Ulysses group of ranks [1, 2] spans nodes ['a', 'b']"]

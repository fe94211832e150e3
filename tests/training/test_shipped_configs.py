"""The shipped flag files (examples/configs/index.json): each regenerates byte-equal from the planner command the index
records, dry-runs at its GPU count with its predicted peak within the GPU's memory, and every documented command that
uses one starts as many processes as the index says. One process: the planner and the dry runs are called in it."""

import importlib.util
import json
import os
import re
import shlex

import pytest

from megatron_longvila.training.dry_run import dry_run

from .example_script import load_example_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INDEX = os.path.join(ROOT, "examples", "configs", "index.json")
STAGES = ["align", "pretrain", "short_sft", "context_extension", "long_sft"]


def _entries():
    with open(INDEX) as f:
        return json.load(f)


def _planner():
    spec = importlib.util.spec_from_file_location("plan_mesh", os.path.join(ROOT, "tools", "plan_mesh.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_index_covers_both_sizes_and_all_stages():
    entries = _entries()
    files = {e["file"] for e in entries}
    assert len(entries) >= 10 and len(files) == len(entries)
    for size in ("qwen2_7b", "qwen2_1_5b"):
        for stage in STAGES:
            assert f"examples/configs/{size}_{stage}.args" in files, (size, stage)
    for e in entries:
        assert set(e) == {"file", "gpus", "gpus_per_node", "gpu", "planner", "dry_run"}, e
        assert e["dry_run"] == ["@" + e["file"], "--data-path", "DATA", "--dry-run", "--world-size", str(e["gpus"]),
                                "--gpus-per-node", str(e["gpus_per_node"]), "--gpu", e["gpu"]], e
        text = open(os.path.join(ROOT, e["file"])).read()
        assert not re.search(r"--(data-path|tokenizer-model|save|load|pretrained-checkpoint)\b", text), e["file"]


def test_configs_regenerate_byte_equal_and_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the index's paths are relative to the repository root
    planner = _planner()
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps({"id": "a", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A square moves."}]}) + "\n")
    extra = load_example_script().extra_args_provider
    tmp_index = tmp_path / "index.json"
    for e in _entries():
        # Regenerate: the recorded command with the file and the index redirected to tmp_path.
        argv = shlex.split(e["planner"])
        assert argv[:2] == ["python", "tools/plan_mesh.py"], e["planner"]
        argv = argv[2:]
        out = tmp_path / os.path.basename(e["file"])
        argv[argv.index("--emit-args") + 1] = str(out)
        argv[argv.index("--index") + 1] = str(tmp_index)
        capsys.readouterr()
        assert planner.main(argv + ["--json"]) == 0, e["planner"]
        planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out.read_bytes() == open(e["file"], "rb").read(), f"{e['file']} differs from what {e['planner']} makes"
        made = [x for x in json.loads(tmp_index.read_text()) if x["file"] == str(out)][-1]
        assert (made["gpus"], made["gpus_per_node"], made["gpu"]) == (e["gpus"], e["gpus_per_node"], e["gpu"]), e

        # Dry-run at the entry's GPU count, exactly as the index states it (DATA: any manifest).
        args = [str(manifest) if a == "DATA" else a for a in e["dry_run"]]
        cut = args.index("--dry-run")
        report = dry_run(args[:cut], extra, world_size=int(args[cut + 2]), gpus_per_node=int(args[cut + 4]),
                         gpu=args[cut + 6])
        mem = report["memory"]
        assert mem["fits"] and mem["predicted_gib_per_gpu"] <= mem["budget_gib"] < mem["gpu_gib"], (e["file"], mem)
        assert report["mesh"]["world_size"] == e["gpus"] and report["spec"]["transformer_impl"] == "transformer_engine"
        # The planner and the dry run predict the same peak (one memory model, the same frames and micro-batches).
        assert planned["plans"][0]["memory_gb"] == pytest.approx(mem["predicted_gib_per_gpu"], abs=0.01), e["file"]
        assert f"@{out} --data-path DATA" in planned["command"], planned["command"]


def _commands(text: str):
    """Shell commands of a markdown text (continuation lines joined)."""
    lines, out, cur = text.splitlines(), [], ""
    for line in lines:
        s = line.strip().lstrip("$ ")
        cur = (cur + " " + s) if cur else s
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        if cur:
            out.append(cur)
        cur = ""
    return out


def _processes(cmd: str):
    """How many training processes a documented launch starts, or a dry run checks (None: neither)."""
    words = shlex.split(cmd.split("#")[0])
    if "--dry-run" in words:
        return int(words[words.index("--world-size") + 1])
    if "examples/slurm/train_longvila.sbatch" in words:
        nodes = int(words[words.index("--nodes") + 1]) if "--nodes" in words else 2  # the script's #SBATCH default
        gpn = int(words[words.index("--gpus-per-node") + 1]) if "--gpus-per-node" in words else 8
        return nodes * gpn
    if "examples/slurm/train_single_node.sh" in words:
        env = [w for w in words if w.startswith("GPUS=")]
        return int(env[0].split("=", 1)[1]) if env else 8
    if "torchrun" in words:
        nodes = int(words[words.index("--nnodes") + 1]) if "--nnodes" in words else 1
        return nodes * int(words[words.index("--nproc-per-node") + 1])
    return None


def test_documented_commands_start_the_index_s_process_counts():
    gpus = {"@" + e["file"]: e["gpus"] for e in _entries()}
    seen = 0
    for doc in ("README.md", "docs/TRAINING.md", "examples/configs/README.md"):
        for cmd in _commands(open(os.path.join(ROOT, doc)).read()):
            files = [w for w in re.findall(r"@examples/configs/\S+\.args", cmd) if w in gpus]
            n = _processes(cmd) if files else None
            if n is None:
                continue
            seen += 1
            assert n == gpus[files[0]], f"{doc}: `{cmd}` starts {n} processes; {files[0]} is for {gpus[files[0]]}"
    assert seen >= 3, "the docs should show the shipped files' launches"

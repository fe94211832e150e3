import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.data.test_dataset import write_mixed_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("av", reason="PyAV (pip install av) is needed to probe the test videos")


def run_tool(name, *args, status=0):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == status, out.stderr
    return out.stdout


def _counts(result):
    return {k: result[k] for k in ("ok", "skipped")}


def test_check_data_counts_good_and_bad(tmp_path, videos):
    path, good_ids, expected = write_mixed_manifest(str(tmp_path), videos)
    flags = ["--json", "--tokens-per-frame", "2", "--num-frames", "4", "--max-video-frames", "100"]
    # Bad samples fail the check (exit 1) unless --max-skip-fraction allows that many.
    result = json.loads(run_tool("check_data.py", path, *flags, status=1))
    assert _counts(result) == {"ok": len(good_ids), "skipped": dict(sorted(expected.items()))}
    bad = sum(expected.values())
    assert not result["passed"] and abs(result["skip_fraction"] - bad / (bad + len(good_ids))) < 1e-12
    allowed = json.loads(run_tool("check_data.py", path, *flags, "--max-skip-fraction", "0.99"))
    assert allowed["passed"] and _counts(allowed) == _counts(result)


def test_check_data_help():
    assert "--json" in run_tool("check_data.py", "--help")


def test_make_manifest_jsonl_and_shards(tmp_path, videos):
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(videos["h264"], folder / "a.mp4")
    (folder / "a.txt").write_text("A grey square moves.\n")
    shutil.copy(videos["vp9"], folder / "sub" / "b.webm")
    (folder / "sub" / "b.json").write_text(json.dumps([{"question": "Colour?", "answer": "Grey."},
                                                       {"q": "Moving?", "a": "Yes."}]))
    shutil.copy(videos["h264"], folder / "nocaption.mp4")
    shutil.copy(videos["corrupt"], folder / "bad.mp4")
    (folder / "bad.txt").write_text("never used")

    manifest = tmp_path / "out" / "train.jsonl"
    summary = json.loads(run_tool("make_manifest.py", str(folder), "--output", str(manifest), "--num-frames", "4",
                                  "--check", "--json"))
    assert summary["samples"] == 2 and summary["left_out"] == {"corrupt_video": 1, "no_caption": 1}
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", os.path.join("sub", "b")]
    assert lines[0]["conversations"][1]["value"] == "A grey square moves." and lines[0]["num_frames"] == 4
    assert [t["from"] for t in lines[1]["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert not os.path.isabs(lines[0]["video"])
    assert _counts(json.loads(run_tool("check_data.py", str(manifest), "--json"))) == {"ok": 2, "skipped": {}}

    shards = tmp_path / "shards"
    summary = json.loads(run_tool("make_manifest.py", str(folder), "--output", str(shards), "--format", "shards",
                                  "--check", "--json"))
    assert len(summary["outputs"]) == 1
    assert _counts(json.loads(run_tool("check_data.py", str(shards), "--json"))) == {"ok": 2, "skipped": {}}


def test_make_manifest_energon_shards(tmp_path, videos):
    pytest.importorskip("megatron.energon", reason="megatron-energon is not installed (pip install megatron-energon)")
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(videos["h264"], folder / "a.mp4")
    (folder / "a.txt").write_text("A grey square moves.\n")
    out = tmp_path / "shards"
    summary = json.loads(run_tool("make_manifest.py", str(folder), "--output", str(out), "--format", "shards",
                                  "--energon", "--json"))
    assert summary["outputs"][-1] == str(out / ".nv-meta")
    assert {"dataset.yaml", "split.yaml", "index.sqlite"} <= set(os.listdir(out / ".nv-meta"))


def test_bench_video_json():
    result = json.loads(run_tool("bench_video.py", "--json", "--resolutions", "64x48", "--codecs", "h264",
                                 "--seconds", "1", "--frames", "4", "--repeats", "1", "--backends", "pyav"))
    rows = {(r["backend"], r["pattern"]): r for r in result["results"]}
    assert rows[("pyav", "uniform")]["frames"] == 4 and rows[("pyav", "all")]["frames"] == 30
    assert all(r["fps"] > 0 for r in rows.values())

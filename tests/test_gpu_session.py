"""tools/gpu_session.sh plans and checks itself without a GPU, through the runner the GPU run uses
(tools/gpu_sections.py): a clean --dry-run exits 0 and writes summary.txt with every section's figures against its
goal (not judged on a CPU) or why it skipped; a section made to raise (LONGVILA_GPU_CHECK_FAIL) gives a non-zero exit,
the other sections' results, and the exception's type and message in summary.txt; a mistyped section is refused."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")


def _env(out, **extra):
    # The caller's environment is kept: this interpreter's python3 first on PATH, OUT, and PYTHONPATH.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, OUT=str(out), PATH=path, **extra)


def _result(path):
    return json.loads(path.read_text().strip().splitlines()[-1])


def test_gpu_session_dry_run_and_a_failing_section(tmp_path):
    clean = tmp_path / "clean"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", "--only", "train,attention,pytest"], capture_output=True,
                       text=True, timeout=400, env=_env(clean), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "planned sections (seconds): train=300" in r.stdout
    res = _result(clean / "train_dry_run.json")
    assert set(res["planned_s"]) == {"a", "b", "c", "d", "e", "f", "g"} and res["status"] == 0
    assert res["b"]["fp32_ok"] and res["b"]["bf16_ok"], res["b"]
    assert res["d"]["loss_abs_diff"] <= 1e-5 and res["d"]["state_dict_mismatch"] == [], res["d"]
    summary = (clean / "summary.txt").read_text()
    assert "train.c: min " in summary and "goal ring schedule efficiency >= 0.95" in summary
    assert "not judged (dry run)" in summary and "MISSED" not in summary and "ERROR" not in summary
    assert "train.f: skipped: needs Transformer Engine on CUDA" in summary
    assert "attention.schedule: skipped: no dry mode" in summary
    assert "pytest: not run in a dry run" in summary

    # One section raises: the run goes on, exits 1, and the summary names the error.
    broken = tmp_path / "broken"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", "--only", "train"], capture_output=True, text=True, timeout=400,
                       env=_env(broken, LONGVILA_GPU_CHECK_FAIL="gpu_train_check:b"), cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    res = _result(broken / "train_dry_run.json")
    assert res["status"] == 1 and res["b"]["error"].startswith("RuntimeError: failure injected")
    assert all("efficiency" in x for x in res["c"])  # the sections after it still ran
    assert res["report"]["d"]["status"] == "ok" and res["report"]["e"]["status"] == "ok"
    summary = (broken / "summary.txt").read_text()
    assert "train.b: ERROR RuntimeError: failure injected by LONGVILA_GPU_CHECK_FAIL" in summary, summary
    assert "train.c: min " in summary and "train: exit 1" in summary

    bad = subprocess.run(["bash", SCRIPT, "--only", "train,trian"], capture_output=True, text=True, timeout=60,
                         env=_env(tmp_path / "bad"), cwd=ROOT)
    assert bad.returncode == 2 and "unknown section 'trian'" in bad.stderr


def test_a_missed_goal_fails_on_the_gpu_only(monkeypatch):
    """The runner's rule on a fake GPU run: a missed goal is a failure, a dry run only prints it."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from gpu_sections import Goal, Section, report_lines, run_sections

    goal = Goal("x >= 1", lambda r: (r["x"] >= 1, f"x {r['x']}"))
    sections = {"low": Section(gpu=lambda: {"x": 0.5}, dry=lambda: {"x": 0.5}, goal=goal),
                "fine": Section(gpu=lambda: {"x": 2}, dry=lambda: {"x": 2}, goal=goal)}
    dry = {}
    assert run_sections("fake", sections, ["low", "fine"], True, dry, lambda d: None) == 0
    assert dry["report"]["low"]["met"] is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gpu = {}
    assert run_sections("fake", sections, ["low", "fine"], False, gpu, lambda d: None) == 1
    assert gpu["report"]["low"] == {"status": "goal missed", "goal": "x >= 1", "figures": "x 0.5", "met": False}
    assert gpu["report"]["fine"]["met"] is True
    assert report_lines("fake", gpu) == ["fake.low: x 0.5 | goal x >= 1: MISSED", "fake.fine: x 2 | goal x >= 1: met"]

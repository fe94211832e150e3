"""tools/gpu_session.sh plans and checks itself without a GPU: --dry-run prints each section's budget and runs the
train section's checks at tiny sizes on the CPU; a mistyped section is refused."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")


def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "planned sections (seconds): train=300" in r.stdout
    res = json.loads((tmp_path / "train_dry_run.json").read_text().strip().splitlines()[-1])
    assert set(res["planned_s"]) == {"a", "b", "c", "d", "e"}
    assert res["b"]["fp32_ok"] and res["b"]["bf16_ok"], res["b"]
    assert res["d"]["loss_abs_diff"] <= 1e-5 and res["d"]["state_dict_mismatch"] == [], res["d"]
    bad = subprocess.run(["bash", SCRIPT, "--only", "train,trian"], capture_output=True, text=True, timeout=60,
                         env=env, cwd=ROOT)
    assert bad.returncode == 2 and "unknown section 'trian'" in bad.stderr

#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine (one call of the device tool).
#
# The machine has PyTorch with CUDA but none of this project's other dependencies and no network: carry
# them as wheels in .whl/ (see docs/PERFORMANCE.md, "Running the GPU checks"). Results go to $OUT (or
# ./gpu_results), one file per check; the last lines printed are a short summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
  > "$out/environment.txt" 2>&1

status=0
# 1. Attention kernels, meshes of ranks sharing the GPU, and the zigzag schedule against a fused causal call.
python3 tools/gpu_check.py --json > "$out/gpu_check.json" 2> "$out/gpu_check.err" || status=1
# 2. Transformer Engine and DALI paths (each skips with its reason when the package is absent).
python3 -m pytest -q -rs tests/attention/test_te_backend.py tests/data/test_video.py > "$out/pytest_gpu.txt" 2>&1 || status=1

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
try:
    res = json.load(open(f"{out}/gpu_check.json"))
except Exception as e:
    print("gpu_check.json unreadable:", e); sys.exit(0)
print(res["date"], res["device"], "torch", res["torch"], "TE" if res["te_available"] else "no TE")
for k in res["kernels"]:
    print("kernel", k["backend"], "causal" if k["causal"] else "full",
          {n: f"{v:.1e}" for n, v in k.items() if isinstance(v, float)} or k.get("skipped"))
for m in res.get("mmsp_mesh", []):
    print("mesh", m["mesh"], m["backend"], {n: f"{v:.1e}" for n, v in m["rel_err"].items()}, "comm", m["comm_ratio"])
for s in res["schedule"]:
    print(f"schedule {s['backend']} T={s['T']} R={s['R']} rank {s['rank']}: efficiency {s['efficiency']:.3f} "
          f"({s['schedule_tflops']:.0f} vs {s['fused_tflops']:.0f} TFLOP/s)")
PY
tail -n 3 "$out/pytest_gpu.txt"
exit $status

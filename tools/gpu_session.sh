#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine (one call of the device tool), in sections.
#
#   tools/gpu_session.sh [--only train,attention,...] [--dry-run] [--list]
#
# Sections, each with its own time budget (seconds, enforced with `timeout`):
#   train      LongVILA steps in bf16, host syncs as errors, GPU vs CPU numerics, ring schedule vs one fused call,
#              MM-SP spec overhead vs Megatron's spec, memory per token of an 8B layer (tools/gpu_train_check.py)
#   attention  kernels and meshes of ranks sharing the GPU (tools/gpu_check.py)
#   pytest     Transformer Engine and DALI tests (each skips with its reason when the package is absent)
#   inference  bf16 generation on one GPU against CPU fp32 (top-2 rule), prefill / decode figures at ~1B
#              (tools/gpu_inference_check.py)
# Later issues add theirs to SECTIONS below (name, budget, command).
#
# The GPU machine has PyTorch with CUDA (Python 3.12) but not megatron-core, PyAV or this project's other
# dependencies, and no network. Carry wheels in .whl/ (git-ignored): `tools/fetch_gpu_wheels.sh` downloads the
# megatron-core cp312 wheel (2.6 MB) here; this script installs whatever .whl/ holds first. Frames are synthetic
# there (no PyAV). Results go to $OUT (or ./gpu_results): one JSON file per section and summary.txt, printed last.
#
# --dry-run (any machine, CI): prints each section's planned seconds and runs the checks of the sections whose tool
# has a dry mode (train, inference, ...) at tiny sizes on the CPU, so the script itself is tested before a GPU run
# spends device time on it.
set -uo pipefail
cd "$(dirname "$0")/.."

# name:budget_seconds:command
SECTIONS=(
  "train:300:python3 tools/gpu_train_check.py --json"
  "attention:150:python3 tools/gpu_check.py --json"
  "pytest:60:python3 -m pytest -q -rs tests/attention/test_te_backend.py tests/data/test_video.py"
  "inference:150:python3 tools/gpu_inference_check.py --json"
  "memory:240:python3 tools/gpu_memory_check.py --json"
)
# Sections whose tool has a --dry-run (tiny sizes on the CPU), run by this script's --dry-run.
DRY_RUNNABLE=" train inference memory "

only="" dry=0 list=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="$2"; shift 2 ;;
    --only=*) only="${1#--only=}"; shift ;;
    --dry-run) dry=1; shift ;;
    --list) list=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

names=()
for s in "${SECTIONS[@]}"; do names+=("${s%%:*}"); done
selected=()
if [ -z "$only" ]; then
  selected=("${names[@]}")
else
  IFS=',' read -r -a want <<< "$only"
  for w in "${want[@]}"; do
    found=0
    for n in "${names[@]}"; do [ "$n" = "$w" ] && found=1; done
    [ $found = 1 ] || { echo "gpu_session.sh: --only: unknown section '$w'; sections: ${names[*]}" >&2; exit 2; }
    selected+=("$w")
  done
fi

budget_of() { for s in "${SECTIONS[@]}"; do [ "${s%%:*}" = "$1" ] && { r="${s#*:}"; echo "${r%%:*}"; }; done; }
command_of() { for s in "${SECTIONS[@]}"; do [ "${s%%:*}" = "$1" ] && { r="${s#*:}"; echo "${r#*:}"; }; done; }

total=0
for n in "${selected[@]}"; do total=$((total + $(budget_of "$n"))); done
if [ $list = 1 ] || [ $dry = 1 ]; then
  echo "planned sections (seconds): $(for n in "${selected[@]}"; do printf '%s=%s ' "$n" "$(budget_of "$n")"; done)total=$total"
  [ $total -gt 540 ] && echo "note: one device call runs at most 600 s and a lease has 900 s: pick sections with --only"
  [ $list = 1 ] && exit 0
fi

out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ $dry = 1 ]; then
  py="${PYTHON:-python3}"
  [ -x .venv/bin/python ] && py=.venv/bin/python
  for n in "${selected[@]}"; do
    if [[ "$DRY_RUNNABLE" == *" $n "* ]]; then
      cmd=$(command_of "$n"); cmd="${cmd/python3 /$py }"
      bash -c "$cmd --dry-run" > "$out/${n}_dry_run.json" 2> "$out/${n}_dry_run.err" \
        || { echo "dry run of the $n section failed (see $out/${n}_dry_run.err)"; tail -n 20 "$out/${n}_dry_run.err"; exit 1; }
      echo "$n: dry run on the CPU passed ($out/${n}_dry_run.json)"
    else
      echo "$n: would run: $(command_of "$n") (budget $(budget_of "$n") s)"
    fi
  done
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -n 1; } > "$out/environment.txt" 2>&1

status=0
: > "$out/summary.txt"
for n in "${selected[@]}"; do
  b=$(budget_of "$n"); cmd=$(command_of "$n")
  t0=$(date +%s)
  timeout "$b" bash -c "$cmd" > "$out/$n.json" 2> "$out/$n.err"; rc=$?
  echo "$n: exit $rc in $(( $(date +%s) - t0 )) s (budget $b s)" | tee -a "$out/summary.txt"
  [ $rc = 0 ] || { status=1; tail -n 5 "$out/$n.err" | tee -a "$out/summary.txt"; }
done

python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
out = sys.argv[1]
def load(name):
    try:
        with open(f"{out}/{name}.json") as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception:
        return None
t = load("train")
if t:
    print(t.get("date"), t.get("device"), "torch", t.get("torch"))
    a = t.get("a", {})
    for k in ("tiny", "1b"):
        if k in a:
            r = a[k]
            print(f"a {k}: sync-free {r.get('sync_free')} step {r.get('step_s', 0):.3f} s peak {r.get('peak_gb', 0):.1f} GB "
                  f"params {r.get('params', 0)/1e9:.2f} B {r.get('sync_error') or ''}")
    if "b" in t:
        print("b:", {k: v for k, v in t["b"].items() if k != "error"}, t["b"].get("error", ""))
    for s in t.get("c", []) if isinstance(t.get("c"), list) else []:
        print(f"c T={s['T']} R={s['R']} rank {s['rank']}: efficiency {s['efficiency']:.3f}")
    if isinstance(t.get("d"), dict):
        print("d:", t["d"])
    if isinstance(t.get("e"), list):
        for r in t["e"]:
            print(f"e seq {r['seq']}: peak {r['peak_bytes_per_token']:.0f} B/token (forward {r['forward_peak_bytes_per_token']:.0f})")
i = load("inference")
if i:
    b = i.get("bf16_vs_cpu", {})
    print("inference bf16 vs CPU fp32:", b.get("verdict"), f"({b.get('steps_compared')} steps)", b.get("error", ""))
    print("inference figures:", i.get("figures"))
g = load("attention")
if g:
    for s in g.get("schedule", []):
        print(f"attention schedule {s['backend']} T={s['T']} R={s['R']} rank {s['rank']}: {s['efficiency']:.3f}")
PY
exit $status

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
# Each tool runs its checks as sections (tools/gpu_sections.py): a section that raises records its error and the
# others still run; on the GPU a section that misses its stated goal (ring efficiency >= 0.95, spec overhead <= 2%,
# no host sync, ...) counts as a failure too. This script runs every selected section, then writes summary.txt: each
# section's figures against its goal, or its error (type and message), or why it skipped. Exit status 1 when any
# section failed, else 0.
#
# --dry-run (any machine, CI): the same runner, every tool with --dry-run: tiny sizes on the CPU, goals printed but
# not judged (the figures mean nothing), sections without a dry mode or needing Transformer Engine say why they skip;
# a clean dry run exits 0. The environment is the caller's: $OUT, $PYTHONPATH (the repository is put first) and the
# python3 first on $PATH.
set -uo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

# name:budget_seconds:command
SECTIONS=(
  "train:300:python3 tools/gpu_train_check.py --json"
  "attention:150:python3 tools/gpu_check.py --json"
  "pytest:60:python3 -m pytest -q -rs -p no:longvila-requirements -p no:longvila-skip-rule tests/attention/test_te_backend.py tests/data/test_video.py"
  "inference:150:python3 tools/gpu_inference_check.py --json"
  "memory:240:python3 tools/gpu_memory_check.py --json"
)
# Sections whose tool has a --dry-run (tiny sizes on the CPU, or a plumbing check), run by this script's --dry-run.
DRY_RUNNABLE=" train attention inference memory "

only="" dry=0 list=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="$2"; shift 2 ;;
    --only=*) only="${1#--only=}"; shift ;;
    --dry-run) dry=1; shift ;;
    --list) list=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
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
case "$out" in /*) ;; *) out="$caller/$out" ;; esac  # a relative $OUT is the caller's
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
suffix=""
if [ $dry = 1 ]; then
  suffix="_dry_run"
elif [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ date -u; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -n 1; } \
  > "$out/environment${suffix}.txt" 2>&1

status=0
: > "$out/runs${suffix}.txt"
for n in "${selected[@]}"; do
  b=$(budget_of "$n"); cmd=$(command_of "$n")
  if [ $dry = 1 ]; then
    if [[ "$DRY_RUNNABLE" != *" $n "* ]]; then
      echo "$n: not run in a dry run (would run: $cmd, budget $b s)" | tee -a "$out/runs${suffix}.txt"
      continue
    fi
    cmd="$cmd --dry-run"
  fi
  t0=$(date +%s)
  timeout "$b" bash -c "$cmd" > "$out/$n${suffix}.json" 2> "$out/$n${suffix}.err"; rc=$?
  echo "$n: exit $rc in $(( $(date +%s) - t0 )) s (budget $b s)" | tee -a "$out/runs${suffix}.txt"
  [ $rc = 0 ] || status=1
done

# summary.txt: every section of every tool against its goal, its error, or why it skipped (tools/gpu_sections.py).
python3 tools/gpu_sections.py "$out" --suffix "$suffix" "${selected[@]}" > "$out/summary.txt"
cat "$out/summary.txt"
exit $status

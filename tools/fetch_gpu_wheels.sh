#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels the GPU machine lacks, into .whl/ (git-ignored), for
# tools/gpu_session.sh to install there: megatron-core 0.16.1 for Python 3.12 (about 2.6 MB). Then run the session
# with the device tool's `carry: [".whl"]`.
#   tools/fetch_gpu_wheels.sh [--help]
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
mkdir -p .whl
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
"$py" -m pip download -q --no-deps --dest .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 megatron-core==0.16.1
ls -la .whl

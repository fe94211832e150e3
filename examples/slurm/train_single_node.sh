#!/bin/bash
# One node, 8 GPUs: torchrun directly. MM-SP over all 8 GPUs as Ulysses (NVLink), no ring.
#   bash examples/slurm/train_single_node.sh --recipe short_sft --data-path data/sft.jsonl --train-iters 1000 ...
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPUS=${GPUS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
torchrun --standalone --nproc-per-node "$GPUS" "$REPO/examples/pretrain_longvila.py" \
    --context-parallel-size "${CP:-$GPUS}" --hierarchical-context-parallel-sizes "${U:-$GPUS}" "${R:-1}" \
    --bf16 --log-interval 1 "$@"

#!/usr/bin/env bash
# Run train_longvila.sbatch on this machine as if Slurm had allocated it NODES nodes of RANKS_PER_NODE ranks:
# the allocation's environment, stand-ins for srun and scontrol (examples/slurm/sim/) that start each node's
# command here, and torchrun's c10d rendezvous on the loopback address. CPU ranks (gloo, --cpu) in fp32.
#
#   bash examples/slurm/simulate.sh --recipe short_sft --vision-encoder siglip_tiny --llm tiny ... --save ckpt
#
# NODES (2), RANKS_PER_NODE (2), JOB_ID, MASTER_PORT (a free port) and PRECISION (fp32) may be set; every argument
# goes to the sbatch script (and from there to examples/pretrain_longvila.py). The defaults of the sbatch put Ulysses
# inside a node (U = RANKS_PER_NODE) and the ring across nodes (R = NODES).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${NODES:-2}
RANKS_PER_NODE=${RANKS_PER_NODE:-2}
names=$(python3 -c "print(','.join(f'sim{i:02d}' for i in range(1, $NODES + 1)))")
port=${MASTER_PORT:-$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
export SLURM_JOB_ID=${JOB_ID:-$RANDOM} SLURM_JOB_NAME=longvila SLURM_NNODES=$NODES SLURM_JOB_NUM_NODES=$NODES \
  SLURM_JOB_NODELIST="$names" SLURM_NODELIST="$names" SLURM_NTASKS_PER_NODE=1 SLURM_GPUS_ON_NODE=$RANKS_PER_NODE \
  SLURM_SUBMIT_DIR="$PWD" GPUS_PER_NODE=$RANKS_PER_NODE MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  PRECISION=${PRECISION:-fp32} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PATH="$HERE/sim:$PATH"
# The simulation runs on the CPU, which a launch asks for explicitly.
exec bash "$HERE/train_longvila.sbatch" --cpu "$@"

#!/bin/bash
# The five LongVILA stages in order, each starting from the previous stage's checkpoint.
# Give each stage its manifest via DATA_<STAGE> (e.g. DATA_ALIGN=data/align.jsonl); CKPT is the root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CKPT=${CKPT:-checkpoints}
prev=""
for stage in align pretrain short_sft context_extension long_sft; do
    var="DATA_${stage^^}"
    data=${!var:?set $var to the $stage manifest}
    init=()
    [ -n "$prev" ] && init=(--pretrained-checkpoint "$CKPT/$prev")
    sbatch --wait "$HERE/train_longvila.sbatch" --recipe "$stage" --data-path "$data" \
        --save "$CKPT/$stage" --load "$CKPT/$stage" "${init[@]}" --train-iters "${ITERS:-1000}" "$@"
    prev=$stage
done

#!/bin/bash
# The five LongVILA stages in order, each from its shipped flag file (examples/configs/) at the node count that
# file's index entry states, each starting from the previous stage's checkpoint.
#   SIZE=qwen2_7b (or qwen2_1_5b)   which files
#   DATA_<STAGE>=manifest           each stage's data (e.g. DATA_ALIGN=data/align.jsonl)
#   CKPT=root                       checkpoints go to CKPT/<stage>
#   INIT=checkpoint                 stage 1's start (a converted base checkpoint, docs/CONVERSION.md), optional
# Further arguments go to every stage (e.g. --tokenizer-model tokenizers/qwen2/tokenizer.json).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SIZE=${SIZE:-qwen2_7b}
CKPT=${CKPT:-checkpoints}
prev=""
for stage in align pretrain short_sft context_extension long_sft; do
    var="DATA_${stage^^}"
    data=${!var:?set $var to the $stage manifest}
    file="examples/configs/${SIZE}_${stage}.args"
    read -r gpus gpn < <(python3 - "$REPO/examples/configs/index.json" "$file" <<'EOF'
import json, sys
entry = [e for e in json.load(open(sys.argv[1])) if e["file"] == sys.argv[2]]
if not entry:
    sys.exit(f"stages.sh: {sys.argv[2]} is not in {sys.argv[1]}")
print(entry[0]["gpus"], entry[0]["gpus_per_node"])
EOF
)
    init=()
    if [ -n "$prev" ]; then init=(--pretrained-checkpoint "$CKPT/$prev");
    elif [ -n "${INIT:-}" ]; then init=(--pretrained-checkpoint "$INIT"); fi
    GPUS_PER_NODE="$gpn" sbatch --wait --nodes $(( (gpus + gpn - 1) / gpn )) --gpus-per-node "$gpn" "$HERE/train_longvila.sbatch" \
        "@$REPO/$file" --data-path "$data" --save "$CKPT/$stage" --load "$CKPT/$stage" ${init[@]+"${init[@]}"} "$@"
    prev=$stage
done

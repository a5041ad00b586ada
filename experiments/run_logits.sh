#!/bin/sh
# The released logits recipe (configs/logits.yaml) with torchrun; extra flags are passed through, e.g.
#   DATA_PATH=/data/imagenet sh experiments/run_logits.sh --output-dir runs/logits
# NGPUS per node (default 8), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes.
exec torchrun --nproc_per_node="${NGPUS:-8}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" -m cakd.train --config "$(dirname "$0")/../configs/logits.yaml" --data-path "${DATA_PATH:-/datasets/imagenet}" --output-dir "${OUTPUT_DIR:-runs/logits}" "$@"

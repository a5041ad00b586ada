#!/bin/sh
# The paper's "RKD" column (configs/rkd.yaml) with torchrun; extra flags are passed through, e.g.
#   DATA_PATH=/data/imagenet sh experiments/run_rkd.sh --output-dir runs/rkd
# NGPUS per node (default 8), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes; MAX_RESTARTS
# (default 0) restarts that torchrun may make after a rank dies. --resume auto: OUTPUT_DIR/checkpoint.pth
# if there is one, so rerunning the same line (a requeue, a restart) goes on where it stopped.
# cakd.train.launch is torchrun that saves and exits 0 on SIGTERM and prints a failure as one line.
OUTPUT_DIR=${OUTPUT_DIR:-runs/rkd}
. "$(dirname "$0")/seeds.sh"  # SEEDS="0 1 2 3 4": one run per seed, into OUTPUT_DIR/seed_N
exec python3 -m cakd.train.launch --nproc_per_node="${NGPUS:-8}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --max-restarts="${MAX_RESTARTS:-0}" -m cakd.train --config "$(dirname "$0")/../configs/rkd.yaml" --data-path "${DATA_PATH:-/datasets/imagenet}" --output-dir "$OUTPUT_DIR" --resume auto "$@"

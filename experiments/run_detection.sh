#!/bin/sh
# Table 4: Faster R-CNN (box AP) or Mask R-CNN (mask AP) on COCO 2017 with our backbone, torchrun through the
# project's launcher. CONFIG names one of configs/detection_{frcnn,mrcnn}_{r50,r101,x101}.yaml (default
# detection_frcnn_r50); extra flags are passed through, e.g.
#   CONFIG=detection_mrcnn_r50 DATA_PATH=/data/coco sh experiments/run_detection.sh --backbone-weights runs/cakd/checkpoint.pth --output-dir runs/det_mrcnn_r50_cakd
# NGPUS per node (default 8; 8 x 2 images = the 1x schedule's 16 per step), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# MAX_RESTARTS as in run_cakd.sh; --resume auto goes on from OUTPUT_DIR/checkpoint.pth if there is one.
OUTPUT_DIR=${OUTPUT_DIR:-runs/${CONFIG:-detection_frcnn_r50}}
exec python3 -m cakd.train.launch --nproc_per_node="${NGPUS:-8}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --max-restarts="${MAX_RESTARTS:-0}" -m cakd.detection --config "$(dirname "$0")/../configs/${CONFIG:-detection_frcnn_r50}.yaml" --data-path "${DATA_PATH:-/datasets/coco}" --output-dir "$OUTPUT_DIR" --resume auto "$@"

#!/bin/sh
# A CAKD run of a few iterations on the CPU, on a generated image folder: it prints and writes
# what a real run does (progress lines, evaluation, checkpoints, TensorBoard, config.yaml).
# Usage: sh scripts/quickstart.sh [extra cakd.train flags]     (OUT=runs/quickstart by default)
# The teacher is random unless TEACHER_WEIGHTS names a file or IMAGENET1K_V1 is reachable.
set -e
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
python scripts/make_image_folder.py "$OUT/data" --classes 4 --train-per-class 24 --val-per-class 4 --size 80
exec python -m cakd.train --config configs/cakd.yaml --device cpu --data-path "$OUT/data" --output-dir "$OUT" \
    --teacher-weights "${TEACHER_WEIGHTS:-none}" --train-crop-size 64 --val-resize-size 64 --val-crop-size 64 \
    --batch-size 8 --workers 2 --epochs 2 --lr-warmup-epochs 1 --lr 0.003 --print-freq 2 --model-ema-steps 2 \
    --lambda-start -1 --lambda-span 1 "$@"

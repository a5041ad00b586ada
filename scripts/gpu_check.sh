#!/bin/sh
# The GPU checks of the issues in one go, on one CUDA device (results under ${OUT}):
#  1. a fresh cakd run through experiments/run_cakd.sh (torchrun, NCCL DDP), bf16 autocast and
#     channels_last, on synthetic data, 40 steps of 64 images;
#  2. the benchmark table, fp32 and bf16 + channels_last, batch 64, with the profile and FLOPs;
#  3. the compiled path beside the eager one (bf16 + channels_last), with its compile time.
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
NGPUS=${NGPUS:-1} OUTPUT_DIR="$OUT/run" sh experiments/run_cakd.sh --dataset synthetic --synthetic-size 2560 \
    --teacher-weights none --device cuda --amp --amp-dtype bfloat16 --channels-last --batch-size 64 --workers 8 \
    --epochs 1 --lr-warmup-epochs 0 --iters-per-epoch 40 --print-freq 10 --resume '' --start-over 2>&1 | tee "$OUT/run.log" | grep -v "^Test: \["
for mode in "--dtype fp32" "--dtype bf16 --channels-last"; do
    python3 scripts/benchmark.py --device cuda --batch-size 64 --steps 10 --warmup 3 $mode --profile --flops \
        --json "$OUT/bench_$(echo $mode | tr -d ' -').json"
done
python3 scripts/benchmark.py --device cuda --batch-size 64 --steps 10 --warmup 3 --dtype bf16 --channels-last \
    --modes ideal logits cakd --compile --json "$OUT/bench_compiled.json"

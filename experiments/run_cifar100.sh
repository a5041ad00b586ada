#!/bin/sh
# Table 1 of the paper on CIFAR-100, on one GPU by default: four runs in order, into
# OUTPUT_DIR (default runs/cifar100_$TEACHER)/{teacher,baseline,logits,cakd}:
#   1. configs/cifar100_teacher.yaml   fine-tune the teacher from its ImageNet weights;
#   2. configs/cifar100_baseline.yaml  the student alone;
#   3. configs/cifar100_logits.yaml    logits distillation from the teacher of step 1;
#   4. configs/cifar100_cakd.yaml      CAKD from the teacher of step 1.
# Each run resumes where it stopped (--resume auto): run the script again after a cut, and
# finished steps are skipped. A SIGTERM (to the script, its process group, the launcher, or every
# process as SLURM sends it) lets the running step save, then stops the script: a step that did
# not reach its last epoch is never followed by the next one.
#   DATA_PATH=data/cifar100 sh experiments/run_cifar100.sh --download   # fetches CIFAR-100 once
# TEACHER (default vit_b_16; vit_l_16, swin_l, ...), TEACHER_WEIGHTS (its ImageNet weights: default
# IMAGENET1K_V1; swin_l needs scripts/convert_weights.py's file), STUDENT (default: the YAMLs'
# resnet50), SEEDS (e.g. "0 1 2 3 4": steps 2-4 once per seed, into OUTPUT_DIR/<step>/seed_N, one teacher for
# all), NGPUS (default 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS (default 0).
# Extra flags go to every step.
set -e
help=
for arg in "$@"; do
    case $arg in -h | --help) help=1 ;; esac  # the flags are the same for every step: the first step's help, then stop
done
TEACHER=${TEACHER:-vit_b_16}
OUT=${OUTPUT_DIR:-runs/cifar100_$TEACHER}
CONFIGS="$(dirname "$0")/../configs"
child=
stop() {  # SIGTERM to this script: pass it to the running step, which saves; then stop
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
    echo "SIGTERM: the running step saved its checkpoint; run the script again to go on"
    exit 0
}
trap stop TERM
run() {  # one step with the launcher, in the background so that a SIGTERM reaches stop() at once
    out=$1
    shift
    python3 -m cakd.train.launch --nproc_per_node="${NGPUS:-1}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
        --max-restarts="${MAX_RESTARTS:-0}" -m cakd.train \
        --data-path "${DATA_PATH:-data/cifar100}" --output-dir "$out" --resume auto "$@" &
    child=$!
    wait "$child"
    child=
    [ -z "$help" ] || exit 0
    finished="import sys; from cakd.train.checkpoints import finished; sys.exit(0 if finished(sys.argv[1]) else 1)"
    if ! python3 -c "$finished" "$out/checkpoint.pth"; then  # stopped mid-way (a SIGTERM to the launcher)
        echo "$out stopped before its last epoch; run the script again to go on"
        exit 0
    fi
}
run "$OUT/teacher" --config "$CONFIGS/cifar100_teacher.yaml" --model "$TEACHER" --weights "${TEACHER_WEIGHTS:-IMAGENET1K_V1}" "$@"
for step in baseline logits cakd; do
    for seed in ${SEEDS:-""}; do  # SEEDS="0 1 2 3 4": each student step once per seed, into $step/seed_N
        run "$OUT/$step${seed:+/seed_$seed}" --config "$CONFIGS/cifar100_$step.yaml" ${STUDENT:+--model "$STUDENT"} \
            --teacher "$TEACHER" --teacher-weights "$OUT/teacher/checkpoint.pth" "$@" ${seed:+--seed "$seed"}
    done
done

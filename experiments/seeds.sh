# Sourced by experiments/run_*.sh after they set OUTPUT_DIR. With SEEDS="0 1 2 3 4" (the paper ran
# every setting with 5 seeds), the script runs once per seed, one after the other, each into
# OUTPUT_DIR/seed_N with --seed N, and stops at the first that fails; scripts/summarize.py
# OUTPUT_DIR/seed_* then gives one row: mean ± std over the seeds. Without SEEDS: nothing happens.
seeds_help=
for arg in "$@"; do
    case $arg in -h | --help) seeds_help=1 ;; esac  # the help once, not once per seed
done
if [ -n "${SEEDS:-}" ] && [ -z "$seeds_help" ]; then
    for arg in "$@"; do
        case $arg in --output-dir | --output-dir=*)
            echo "error: with SEEDS, name the folder with OUTPUT_DIR=..., not --output-dir (each seed writes OUTPUT_DIR/seed_N)" >&2
            exit 2 ;;
        esac
    done
    for seed in $SEEDS; do
        SEEDS= OUTPUT_DIR="$OUTPUT_DIR/seed_$seed" sh "$0" "$@" --seed "$seed" || exit $?
    done
    exit 0
fi

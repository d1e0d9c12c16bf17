#!/usr/bin/env bash
# Grid throughput with one worker against N workers on this machine (--workers).
#
#   bash benchmarks/workers.sh [DATA] [N]     # DATA: default data/cifar10-jpeg; N: default 2
#
# Trains the same 4-point grid (learning rate x shuffle, batch 100, 2 epochs on a
# 2,000-image subset) twice into fresh workdirs, once with --workers=1 and once
# with --workers=N, and prints each wall time, the images trained per second and
# the ratio. Run it on an otherwise idle machine. The decoded image cache is warmed
# first, and both runs share one XLA compilation cache, so neither pays more
# start-up than the other.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/cifar10-jpeg}
N=${2:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export JAX_COMPILATION_CACHE_DIR="$WORK/xla"
ARGS=(--config configs/paper_sweep.py --config.data.path="$DATA" --config.num_epochs=2
      --config.data.train_subset=2000 "--config.sweep.batch_size=(100,)"
      "--config.sweep.learning_rate=(0.01,0.001)")
IMAGES=$((4 * 2 * 2000))
python -m resnet_jax.main "${ARGS[@]}" --workdir "$WORK/warm" --config.num_epochs=1 \
    "--config.sweep.learning_rate=(0.01,)" "--config.sweep.shuffle=(True,)" > "$WORK/warm.log" 2>&1
for workers in 1 "$N"; do
    start=$(date +%s.%N)
    python -m resnet_jax.main "${ARGS[@]}" --workdir "$WORK/w$workers" --workers="$workers" \
        > "$WORK/w$workers.log" 2>&1
    end=$(date +%s.%N)
    seconds=$(python -c "print(round($end - $start, 1))")
    echo "{\"workers\": $workers, \"seconds\": $seconds, \"images_per_second\": $(python -c "print(round($IMAGES / ($end - $start), 1))")}"
    eval "t$workers=$seconds"
done
python -c "print('{\"speedup\": %.2f}' % ($t1 / $(eval echo \$t$N)))"

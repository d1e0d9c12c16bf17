#!/usr/bin/env bash
# Searches over several seeds against the grid: the evidence in results/search_seeds/.
#
#   bash benchmarks/search_seeds.sh DATA_DIR [WORK_DIR] [GRID_DIR]
#
# On the budget of configs/cpu_search.py (3,000 training images, 1,000 held out
# for selection, 6 epochs): TPE with successive halving over seeds 0-4, random
# search with the same pruner over the same seeds, and TPE without pruning over
# seeds 0-1, each study one worker, one after the other (a study already done
# is skipped, a study interrupted resumes). Then benchmarks/search_vs_grid.py
# compares every arm with the grid study GRID_DIR (default: the committed
# results/search/grid) and writes seeds.md, seeds.csv and studies.csv into
# WORK_DIR.
set -euo pipefail
DATA=${1:?usage: bash benchmarks/search_seeds.sh DATA_DIR [WORK_DIR] [GRID_DIR]}
WORK=${2:-runs/search_seeds}
GRID=${3:-results/search/grid}
SEEDS=${SEEDS:-0 1 2 3 4}
UNPRUNED_SEEDS=${UNPRUNED_SEEDS:-0 1}

study() {  # study NAME SEED [--config.X=Y ...]
  local name=$1 seed=$2
  shift 2
  python -m resnet_jax.main --config cpu_search --workdir "$WORK/$name" \
    --config.data.path="$DATA" --config.search.seed="$seed" "$@" \
    > "$WORK/$name.log" 2>&1
  echo "$name: done"
}

mkdir -p "$WORK"
for seed in $SEEDS; do
  study "tpe_sh_s$seed" "$seed"
  study "random_sh_s$seed" "$seed" --config.search.sampler=random
done
for seed in $UNPRUNED_SEEDS; do
  study "tpe_s$seed" "$seed" --config.search.pruner=none
done

arm() { for seed in $2; do printf '%s ' "$WORK/$1_s$seed"; done; }
# shellcheck disable=SC2046  # One argument per study folder.
python benchmarks/search_vs_grid.py --grid "$GRID" \
  --arm "TPE + SH" $(arm tpe_sh "$SEEDS") \
  --arm "random + SH" $(arm random_sh "$SEEDS") \
  --arm "TPE, no pruning" $(arm tpe "$UNPRUNED_SEEDS") \
  --out "$WORK"

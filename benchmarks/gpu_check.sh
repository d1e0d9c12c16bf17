#!/usr/bin/env bash
# The GPU check: the speed figures of BENCHMARKS.md on one accelerator, in under 8 minutes.
#
# Run it on a GPU machine from the repository root, with jax (CUDA), flax, optax,
# orbax, torch and pillow installed and the data archive at data/cifar10-jpeg.tar.gz:
#
#   OUT=gpu_check_out bash benchmarks/gpu_check.sh
#
# Wheels found in .whl/ are installed first: on a machine without network access,
# fetch the pure-Python ones it lacks (clu, ml_collections, tensorboardX) with
# `bash benchmarks/fetch_wheels.sh` where the package registry is reachable.
#
# Each step has its own time limit and the script goes on when one fails, so a
# partial result still comes back. Everything lands in $OUT (at most 8 files):
#   gpu_check.json   every step's results, merged (bench rows, the 50-epoch run,
#                    the vectorised sweep's table, PyTorch references, timings)
#   gpu_check.log    the whole log
#   results.md/.csv  the 18-run table of the vectorised sweep
# GPU_CHECK_QUICK=1 shrinks every step to a few seconds (to test the script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
mkdir -p "$WORK"
LOG="$OUT/gpu_check.log"
QUICK=${GPU_CHECK_QUICK:-0}
START=$(date +%s)
rm -f "$WORK/steps.jsonl"
exec > >(tee -a "$LOG") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) quick=$QUICK"
export PYTHONUNBUFFERED=1
export RESNET_JAX_CACHE="$WORK/cache"
# Let JAX take what it needs instead of 75% of the GPU up front (PyTorch shares it).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
# This checkout's package laid out as its wheel lays it out (configs/ as resnet_jax.configs),
# so that it runs whether or not the package is installed.
rm -rf "$WORK/src" && mkdir -p "$WORK/src" && cp -r resnet_jax "$WORK/src/" &&
    cp -r configs "$WORK/src/resnet_jax/configs" || exit 1
export PYTHONPATH="$WORK/src:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c 'import jax, flax, optax, orbax.checkpoint, clu, ml_collections; print("jax", jax.__version__, jax.devices())' || exit 1

# The data: the JPEG copy of CIFAR-10, unpacked once and decoded once (cached).
DATA="$WORK/cifar10-jpeg"
if [ ! -d "$DATA/train" ]; then
    mkdir -p "$DATA" && tar -xzf data/cifar10-jpeg.tar.gz -C "$DATA" || exit 1
fi

# Whole-script budget: steps are cut to what is left of it (minus time to merge).
BUDGET=${GPU_CHECK_BUDGET:-450}
step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs its status.
    local name=$1 limit=$2
    shift 2
    local t0 left
    t0=$(date +%s)
    left=$((BUDGET - (t0 - START) - 15))
    if [ "$left" -lt 10 ]; then
        echo "== step $name: skipped, the budget is spent"
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0}" >> "$WORK/steps.jsonl"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== step $name (limit ${limit}s, $(($(date +%s) - START))s elapsed)"
    timeout --signal=TERM --kill-after=20 "$limit" "$@"
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >> "$WORK/steps.jsonl"
    echo "== step $name: rc=$rc in $(($(date +%s) - t0))s"
}

if [ "$QUICK" = 1 ]; then
    SUB=--config.data.train_subset=2000; EPOCHS=2; BENCH_STEPS=3; BENCH_EPOCHS=0
    PAPER_BS=100; R18_BS=100; SWEEP_EPOCHS=1; SWEEP_SUB=--config.data.train_subset=1000
    TORCH_EPOCHS=1; TORCH_SUB=(--train_subset 500); DTYPES=float32
else
    SUB=; EPOCHS=50; BENCH_STEPS=50; BENCH_EPOCHS=2
    PAPER_BS=100,500,1000; R18_BS=500; SWEEP_EPOCHS=50; SWEEP_SUB=
    TORCH_EPOCHS=2; TORCH_SUB=(); DTYPES=float32,bfloat16
fi

# 1. The paper model's epoch time at batch 100/500/1000, fp32 and bf16, whole
#    epochs in one compiled call each (steps_per_call=0).
step bench_paper 100 python3 -m resnet_jax.cli.bench --data "$DATA" --models paper \
    --batch_sizes $PAPER_BS --dtypes $DTYPES --steps $BENCH_STEPS --epochs $BENCH_EPOCHS \
    --steps_per_call 0 --torch none --json "$WORK/bench_paper.json"

# 2. The study's best configuration (batch 500, lr 0.01, no shuffle), 50 epochs.
step best_run 100 python3 -m resnet_jax.main --config default \
    --workdir "$WORK/best" --overwrite --config.data.path="$DATA" --config.batch_size=500 \
    --config.shuffle=False --config.steps_per_call=0 --config.num_epochs=$EPOCHS $SUB

# 3. The 18-run sweep, each batch size's 6 runs vectorised into one program.
step sweep 150 python3 -m resnet_jax.main --config paper_sweep \
    --workdir "$WORK/sweep" --config.data.path="$DATA" --config.sweep.vectorize=True \
    --config.steps_per_call=0 --config.num_epochs=$SWEEP_EPOCHS $SWEEP_SUB

# 4. ResNet-18 images/s, fp32 and bf16, against tuned PyTorch (torch.compile).
step bench_resnet18 70 python3 -m resnet_jax.cli.bench --models resnet18 --batch_sizes $R18_BS \
    --dtypes $DTYPES --steps $BENCH_STEPS --steps_per_call 0 --torch tuned \
    --json "$WORK/bench_resnet18.json"

# 5. The PyTorch references' epoch times on the same data: the study's way at
#    batch 100, tuned at 500 (fp32 and bf16).
step torch_study 60 python3 benchmarks/torch_reference.py --impl study --batch_size 100 \
    --epochs $TORCH_EPOCHS --data "$DATA" --num_workers 8 "${TORCH_SUB[@]}" \
    --json "$WORK/torch_study.json"
for dtype in ${DTYPES//,/ }; do
    step "torch_tuned_$dtype" 60 python3 benchmarks/torch_reference.py --impl tuned \
        --batch_size 500 --dtype "$dtype" --epochs $TORCH_EPOCHS --data "$DATA" \
        "${TORCH_SUB[@]}" --json "$WORK/torch_tuned_$dtype.json"
done

# Merge everything into one JSON.
cp "$WORK/sweep/results.md" "$WORK/sweep/results.csv" "$OUT/" 2>/dev/null
python3 - "$WORK" "$OUT/gpu_check.json" <<'PY'
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
merged = {'steps': [json.loads(l) for l in open(os.path.join(work, 'steps.jsonl'))]}
for name in ('bench_paper', 'bench_resnet18', 'torch_study', 'torch_tuned_float32',
             'torch_tuned_bfloat16'):
    merged[name] = load(os.path.join(work, name + '.json'))
merged['best_run'] = load(os.path.join(work, 'best', 'summary.json'))
runs = {}
for path in sorted(glob.glob(os.path.join(work, 'sweep', '*', 'summary.json'))):
    s = load(path) or {}
    runs[os.path.basename(os.path.dirname(path))] = {
        k: s.get(k) for k in ('status', 'epochs_completed', 'train_accuracy', 'test_accuracy',
                              'best_test_accuracy', 'wall_seconds', 'vectorized_lanes')}
merged['sweep_runs'] = runs
with open(out, 'w') as f:
    json.dump(merged, f, indent=1)
print('wrote', out)
PY
echo "== done in $(($(date +%s) - START))s"

#!/usr/bin/env bash
# The GPU rows of ltrepro's speed benchmarks in one run of a few minutes, from the repository root:
#   bash bench/gpu.sh [RESULTS_DIR]        (default: $OUT when set, else bench/gpu)
# 1. install: where mlflow is missing (the lent GPU machines have torch but no package index), the
#    wheels in .whl/ (bench/gpu_wheels.sh fills it beforehand) go to a private folder on PYTHONPATH;
# 2. `ltrepro bench train`: the reference loop, the engine (bf16 autocast, channels_last) and the
#    compiled engine side by side, 3 interleaved epochs each, ratios (b)/(a) and (c)/(a);
# 3. `ltrepro bench schedule --compile`: a 200-epoch CIFAR-100-LT-sized stage-1 schedule (target: 60 s
#    of training), then the same schedule eager, the engine as `ltrepro train` runs it, under a limit.
# QUICK=1 DEVICE=cpu runs every step on the smoke settings (a check of the script, not a figure).
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-bench/gpu}}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
quick=()
schedule_epochs=200
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); schedule_epochs=2; fi
mkdir -p "$results"
if ! "$python" -c "import mlflow" 2> /dev/null; then
  compgen -G ".whl/*.whl" > /dev/null || { echo "mlflow is not installed and .whl/ holds no wheels: run bench/gpu_wheels.sh first" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ltrepro-site .whl/*.whl
  export PYTHONPATH=/tmp/ltrepro-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  ! command -v nvidia-smi > /dev/null || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} | tee "$results/machine.txt"
"$python" -m ltrepro bench train --device "$device" --epochs 3 "${quick[@]}" --out "$results/train.json" | tee "$results/train.md"
"$python" -m ltrepro bench schedule --device "$device" --compile --epochs "$schedule_epochs" "${quick[@]}" \
  --out "$results/schedule_compiled.json" | tail -2 | tee "$results/schedule.txt"
# The eager schedule is launch-bound on a GPU (minutes): it gets what is left of a short run.
timeout "${EAGER_LIMIT_S:-240}" "$python" -m ltrepro bench schedule --device "$device" --epochs "$schedule_epochs" "${quick[@]}" \
  --out "$results/schedule_eager.json" | tail -2 | tee -a "$results/schedule.txt" \
  || echo "eager schedule stopped at its ${EAGER_LIMIT_S:-240} s limit: no eager figure" | tee -a "$results/schedule.txt"

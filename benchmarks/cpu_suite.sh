#!/usr/bin/env bash
# The CPU measurements behind docs/benchmarks.md, one after the other (never two timed runs at once).
#   benchmarks/cpu_suite.sh [OUT_DIR]      (default runs/bench-cpu; needs ../shared/data and the MACE peer)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-cpu}
DATA=${DATA:-../shared/data}
PY=.venv/bin/python
mkdir -p "$OUT"
test -x benchmarks/peers/.venv-mace/bin/python || benchmarks/peers/mace/install.sh

# rMD17 aspirin, 30 minutes each, equiforce and MACE (64x0e+64x1o, float32) on the same split
$PY benchmarks/compare_rmd17.py --train "$DATA/rmd17/rmd17_aspirin_train_01.npz" \
    --test "$DATA/rmd17/rmd17_aspirin_test_01.npz" --budget-min 30 --device cpu --dtype float32 \
    --mace-hidden-irreps 64x0e+64x1o --out "$OUT/aspirin_cpu30.json" -- --preset mace64 --quiet

# ethanol out of distribution
$PY benchmarks/ethanol_ood.py --data "$DATA/ethanol_botnet" --budget-min 20 --device cpu --dtype float32 \
    --out "$OUT/ethanol_ood/results.json" --work-dir "$OUT/ethanol_ood/train"

#!/usr/bin/env bash
# Install the MACE peer into its own venv (never a dependency of equiforce):
#   benchmarks/peers/.venv-mace with torch 2.13.0 (the CPU wheel on this machine; use your CUDA build
#   elsewhere) and mace-torch 0.3.16 — the version the benchmarks in docs/benchmarks.md were run against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-mace
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q "mace-torch==${MACE_VERSION:-0.3.16}"
# mace-torch pins e3nn 0.4.4, which torch.load()s a pickled constants file; torch >= 2.6 refuses that by
# default, so every peer script runs with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (set by the scripts themselves).
echo "MACE peer ready: $(cd .. && pwd)/peers/$VENV"

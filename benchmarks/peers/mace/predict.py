"""Energies and forces of a trained MACE model on structure files (run with the peer venv's python).

    benchmarks/peers/.venv-mace/bin/python benchmarks/peers/mace/predict.py --model mace.model \
        --files test_MD.xyz test_dimers.xyz --device cpu --dtype float32 --out predictions.json

Writes ``{FILE: {"energy": [...], "forces": [[[fx, fy, fz], ...], ...]}}`` with every frame in file order (eV,
eV/Å), so a benchmark in equiforce's own venv can rate the peer exactly as it rates equiforce.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--files", nargs="+", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from ase.io import read
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=args.model, device=args.device, default_dtype=args.dtype)
    result = {}
    for path in args.files:
        energies, forces = [], []
        for atoms in read(path, index=":"):
            atoms.calc = calc
            energies.append(float(atoms.get_potential_energy()))
            forces.append(atoms.get_forces().tolist())
        result[path] = {"energy": energies, "forces": forces}
    Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

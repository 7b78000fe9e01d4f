"""MACE (mace-torch, peer venv) MD speed through ASE, one measurement per process.

Called by ``benchmarks/md_speed.py``; prints one JSON object.  Model size as the issue fixes it:
128x0e+128x1o, spherical harmonics to 3, correlation 3, 2 layers, 5 Å, random weights.

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 benchmarks/peers/.venv-mace/bin/python \
        benchmarks/peers/mace/md_speed_mace.py --repeat 6 --steps 5 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.io import read
from ase.md.verlet import VelocityVerlet


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def build_model(elements: list[int], dtype: torch.dtype):
    from e3nn import o3
    from mace import modules

    torch.set_default_dtype(dtype)
    return modules.MACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=6, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(elements), hidden_irreps=o3.Irreps("128x0e+128x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(elements)), avg_num_neighbors=40.0,
        atomic_numbers=elements, correlation=3, gate=torch.nn.functional.silu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=4, help="fcc Cu conventional cell repeated n×n×n")
    parser.add_argument("--xyz", help="a structure file instead of the Cu box (e.g. one aspirin)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mace.calculators import MACECalculator

    dtype = getattr(torch, args.dtype)
    if args.xyz:
        atoms = read(args.xyz)
    else:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((args.repeat,) * 3)
        atoms.rattle(0.05, seed=0)
    elements = sorted(set(atoms.numbers.tolist()))
    model = build_model(elements, dtype).to(args.device)
    atoms.calc = MACECalculator(models=model, device=args.device, default_dtype=args.dtype)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(args.warmup)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    start = time.perf_counter()
    dyn.run(args.steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max(0.0, rss_mb("VmHWM") - before)
    print(json.dumps({"engine": "mace", "mode": "ase", "natoms": len(atoms), "n_systems": 1,
                      "device": args.device, "dtype": args.dtype, "ms_per_step": 1e3 * seconds,
                      "atom_steps_per_s": len(atoms) / seconds, "peak_mem_mb_per_atom": peak / len(atoms)}))


if __name__ == "__main__":
    main()

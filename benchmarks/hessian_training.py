"""What Hessian labels buy: ethanol with GFN2-xTB, forces only vs forces + Hessians vs forces at equal calls.

    python benchmarks/hessian_training.py --frames 16 --train-time 150 --out runs/hessian_training.json

Three models of the demo's architecture and training settings (float32, 1 thread, ``--train-time`` seconds each,
from scratch), trained on frames of GFN2-xTB Langevin MD of ethanol at 300/500/800 K:

* ``forces``: ``--frames`` frames with energy and forces;
* ``forces_hessians``: the same frames, each also with its Hessian (central finite differences of xTB forces,
  6N = 54 calls per frame, ``equiforce.data.hessian_labels``), trained with the Hessian-vector-product loss;
* ``forces_equal_calls``: as many energy + force frames as the second arm's oracle calls
  (``frames × (1 + 6N)``, capped by ``--pool-frames``) — what the same oracle budget buys without Hessians;
* ``forces_equal_analytic_cost``: ``frames × --analytic-cost`` energy + force frames — what the second arm's
  labels would cost with analytic Hessians, counted in single points (default 4.2: PySCF PBE/def2-SVP on
  ethanol, energy + forces + analytic Hessian against energy + forces, measured in docs/benchmarks.md).

Every arm trains with the demo loop's settings, its loss included (Huber with delta 0.01 since 2026-12-06;
``--loss mse`` for the squared error the first measurements used).

Rated on a test set of xTB MD frames from separate trajectories (force and energy MAE) and on the xTB
minimum of ethanol (BFGS to 1e-4 eV/Å): the model's Hessian there against xTB's, entry-wise and as harmonic
frequencies (above the six rigid-body modes).  JSON ``arms``: per arm ``frames``, ``oracle_calls``,
``epochs``, ``f_mae_mev_a``, ``e_mae_mev_atom``, ``hessian_mae`` (meV/Å²), ``frequency_mae_cm``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmd17 import add_penalty_args  # noqa: E402

from equiforce.active.oracle import import_object  # noqa: E402
from equiforce.active.reference import cached_md_set  # noqa: E402
from equiforce.data.hessian_labels import finite_difference_hessian  # noqa: E402
from equiforce.data.io import read_configurations, write_extxyz  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.demo.ethanol import ORACLE, demo_settings, learn_config  # noqa: E402
from equiforce.evaluate import evaluate  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write, atomic_write_text  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

TEMPERATURES = [300.0, 500.0, 800.0]


def oracle():
    return import_object(ORACLE[0])(**ORACLE[1])


def with_hessians(frames: list[Configuration], cache: Path, delta: float) -> list[Configuration]:
    """The frames with finite-difference xTB Hessians, cached as extxyz (the labelling is the slow part)."""
    if cache.is_file():
        cached = read_configurations(cache)
        if len(cached) == len(frames) and all(np.allclose(a.positions, b.positions) for a, b in zip(cached, frames)):
            return cached
    calculator = oracle()
    labelled = []
    for config in frames:
        hessian = finite_difference_hessian(config.to_atoms(), calculator, delta=delta)
        labelled.append(replace(config, hessian=hessian))
    atomic_write(cache, lambda tmp: write_extxyz(labelled, tmp))
    return labelled


def xtb_minimum(delta: float) -> Configuration:
    """Ethanol relaxed with xTB, with its xTB Hessian."""
    from ase.build import molecule
    from ase.optimize import BFGS

    atoms = molecule("CH3CH2OH")
    atoms.calc = oracle()
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=500)
    return Configuration.from_atoms(atoms.copy(), energy=float(atoms.get_potential_energy()),
                                    forces=np.array(atoms.get_forces()),
                                    hessian=finite_difference_hessian(atoms, oracle(), delta=delta),
                                    source="xtb-minimum")


def train_arm(frames: list[Configuration], directory: Path, seconds: float, seed: int,
              hessian_weight: float, hessian_vectors: int, loss: dict[str, Any]) -> dict[str, Any]:
    from equiforce.train.trainer import train_configs

    config = learn_config(directory, Path("unused"), loop_minutes=1e6, seed=seed, progress=False)
    training = {**config["training"], "max_time": seconds, "hessian_weight": hessian_weight,
                "hessian_vectors": hessian_vectors, **loss}
    return train_configs(frames, None, config["model"], training, directory, valid_fraction=0.1, resume=True,
                         progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="labelled frames of the first two arms")
    parser.add_argument("--pool-frames", type=int, default=900, help="oracle-MD frames available to the third arm")
    parser.add_argument("--test-frames", type=int, default=90, help="test frames (a third per temperature)")
    parser.add_argument("--train-time", type=float, default=150.0, help="training seconds per arm")
    parser.add_argument("--hessian-weight", type=float, default=1.0)
    parser.add_argument("--hessian-vectors", type=int, default=1)
    parser.add_argument("--delta", type=float, default=0.005, help="finite-difference step of the Hessians (Å)")
    parser.add_argument("--analytic-cost", type=float, default=4.2,
                        help="single points that one analytic Hessian (with its energy and forces) costs")
    parser.add_argument("--interval", type=int, default=20, help="MD steps between the pool's frames")
    parser.add_argument("--equilibration", type=int, default=200, help="MD steps before the first frame")
    # every arm's penalty: the demo loop's own unless asked otherwise, read from its config as the loop parses it
    loop = demo_settings().training
    add_penalty_args(parser, loop.loss, loop.huber_delta,
                     f"every arm's penalty (default: the demo loop's, {loop.loss}; mse gives the runs of 2026-12-04)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/hessian_training"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/hessian_training.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loss = {"loss": args.loss, "huber_delta": args.huber_delta}
    from ase.build import molecule

    start, seconds = molecule("CH3CH2OH"), {}
    t0 = time.perf_counter()
    test, _ = cached_md_set(args.workdir / "cache", start, ORACLE, TEMPERATURES, -(-args.test_frames // 3),
                            interval=args.interval, equilibration=args.equilibration, seed=args.seed + 101)
    pool, _ = cached_md_set(args.workdir / "cache", start, ORACLE, TEMPERATURES, -(-args.pool_frames // 3),
                            interval=args.interval, equilibration=args.equilibration, seed=args.seed + 202)
    seconds["md_sets"] = time.perf_counter() - t0
    order = np.random.default_rng(args.seed).permutation(len(pool))
    chosen = [pool[i] for i in order[:args.frames]]
    t0 = time.perf_counter()
    hessian_frames = with_hessians(chosen, args.workdir / "cache" / f"hessians_{args.frames}_{args.seed}.xyz",
                                   args.delta)
    minimum = xtb_minimum(args.delta)
    seconds["hessians"] = time.perf_counter() - t0
    calls_per_hessian = 6 * len(start)
    equal_calls = min(len(pool), args.frames * (1 + calls_per_hessian))
    arms = {
        "forces": ([replace(c, hessian=None) for c in hessian_frames], 0.0, args.frames),
        "forces_hessians": (hessian_frames, args.hessian_weight, args.frames * (1 + calls_per_hessian)),
        "forces_equal_calls": ([pool[i] for i in order[:equal_calls]], 0.0, equal_calls),
    }
    analytic = min(len(pool), round(args.frames * args.analytic_cost))
    if args.analytic_cost > 0:
        arms["forces_equal_analytic_cost"] = ([pool[i] for i in order[:analytic]], 0.0, analytic)
    if args.arms:
        unknown = set(args.arms.split(",")) - set(arms)
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {sorted(arms)}")
        arms = {name: arm for name, arm in arms.items() if name in args.arms.split(",")}
    results: dict[str, Any] = {}
    for name, (frames, weight, calls) in arms.items():
        t0 = time.perf_counter()
        trained = train_arm(frames, args.workdir / name, args.train_time, args.seed, weight, args.hessian_vectors,
                            loss)
        model = load_model(trained["best_model"])
        on_test = evaluate(model, test)
        at_minimum = evaluate(model, [minimum])
        results[name] = {"frames": len(frames), "oracle_calls": calls, "epochs": trained["epochs"],
                         "f_mae_mev_a": on_test["forces_mae"], "e_mae_mev_atom": on_test["energy_per_atom_mae"],
                         "hessian_mae": at_minimum["hessian_mae"], "frequency_mae_cm": at_minimum["frequency_mae_cm"],
                         "seconds": time.perf_counter() - t0}
    report = {"benchmark": "hessian_training", "oracle": "GFN2-xTB (tblite)", "molecule": "ethanol",
              "n_test": len(test), "n_pool": len(pool), "train_time_s": args.train_time,
              "hessian_weight": args.hessian_weight, "hessian_vectors": args.hessian_vectors, "delta": args.delta,
              "loss": loss["loss"], "huber_delta": loss["huber_delta"],
              "analytic_cost": args.analytic_cost,
              "arms": results, "seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    header = f"{'arm':<26} {'frames':>7} {'oracle calls':>13} {'epochs':>7} {'F MAE meV/Å':>12} " \
             f"{'E MAE meV/atom':>15} {'Hessian MAE meV/Å²':>19} {'freq MAE cm⁻¹':>14}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<26} {r['frames']:>7} {r['oracle_calls']:>13} {r['epochs']:>7.1f} {r['f_mae_mev_a']:>12.1f} "
              f"{r['e_mae_mev_atom']:>15.2f} {r['hessian_mae']:>19.0f} {r['frequency_mae_cm']:>14.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)

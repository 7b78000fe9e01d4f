"""Uncertainty benchmark: an ensemble and the single-model estimator, trained within one time budget.

    python benchmarks/uq.py --train train.xyz --test test_MD.xyz test_H_removal.xyz test_dimers.xyz \
        --isolated isolated_atoms.xyz --budget-min 12 --out results.json

Trains ``--members`` members (seeds seed..seed+M-1, 85% of the budget split between them; members after
the first train as many epochs as the first reached in its share, so a busy machine cannot leave some
members half-trained), builds the
ensemble (one batched pass) and the single-model estimator (NLL heads on member 0, 15% of the budget),
calibrates both on the same held-out 10% of ``--train``, and rates them on every test file and on their
union (``all``).  Writes JSON ``{"ensemble": {STEM: metrics}, "single": {...}, "cost_ratio_ensemble",
"cost_ratio_single", "cost": {...}}`` and prints a table.  The test files are only evaluated, never used to
choose anything.  Cost ratios are median wall times (forward + forces) relative to member 0, all variants
interleaved in one process with one thread, for one molecule, a batch of molecules and a ~1,000-atom
periodic box; the ensemble is timed with its default member pass ("auto", what ``cost_ratio_ensemble``
reports) and with each pass forced ("batched": one vmap pass; "sequential": members one after the other).
``--reuse`` evaluates and times the two model files of an earlier run in ``--work-dir`` without training.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equiforce.data.graph import collate, config_to_graph, to_device  # noqa: E402
from equiforce.data.io import read_configurations  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.evaluate import resolve_device  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.train.trainer import DTYPES  # noqa: E402
from equiforce.uq.config import HeadsConfig, UQConfig, UQTrainConfig  # noqa: E402
from equiforce.uq.file import save_uq_model  # noqa: E402
from equiforce.uq.fit import build_uq_potential  # noqa: E402
from equiforce.uq.metrics import uq_report  # noqa: E402
from equiforce.uq.predict import UQPredictions, predict  # noqa: E402
from equiforce.uq.train import build_ensemble, split_data, train_members  # noqa: E402
from equiforce.utils.cli_types import positive_float, positive_int  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

MODEL = dict(channels=32, max_l=1, sh_lmax=2, correlation=2, num_layers=2, cutoff=5.0, radial_mlp=[32, 32])
COST_CASES = ("molecule", "molecules", "box")


def training_settings(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The rMD17 benchmark's recipe (warm-up, cosine over the budget, stage two), per member."""
    return {"epochs": 100000, "batch_size": args.batch_size, "valid_batch_size": 25, "lr": args.lr,
            "warmup_steps": 50, "scheduler": "cosine", "min_lr": args.lr / 100, "ema_decay": 0.99,
            "energy_weight": 1.0, "forces_weight": 100.0,
            "stage_two": {"start": 0.75, "lr": args.lr / 10, "energy_weight": 1000.0},
            "clip_grad": 10.0, "seed": args.seed, "device": args.device, "dtype": args.dtype, "max_time": seconds}


def ethanol_box(n_molecules: int = 111, density_g_cm3: float = 0.79, seed: int = 0):
    """A periodic box of randomly oriented ethanol molecules on a grid (~1,000 atoms; for timing only)."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    unit = molecule("CH3CH2OH")
    side = (n_molecules * unit.get_masses().sum() * 1.66054 / density_g_cm3) ** (1 / 3)
    per_axis = int(np.ceil(n_molecules ** (1 / 3)))
    spacing = side / per_axis
    rng = np.random.default_rng(seed)
    box = Atoms(cell=[side] * 3, pbc=True)
    for index in range(n_molecules):
        site = np.array(np.unravel_index(index, (per_axis,) * 3)) + 0.5
        mol = unit.copy()
        mol.positions = (mol.positions - mol.positions.mean(0)) @ Rotation.random(random_state=rng.integers(1 << 30)
                                                                                  ).as_matrix().T + site * spacing
        box += mol
    return box


def timed(model, batch, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(batch)
        out["forces"].sum().item()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class MemberPass:
    """The ensemble called with one fixed member pass (its default, "auto", is what ``ensemble`` times)."""

    def __init__(self, ensemble, mode: str) -> None:
        self.ensemble, self.mode = ensemble, mode

    def __call__(self, batch):
        previous = self.ensemble.member_pass
        self.ensemble.set_member_pass(self.mode)
        try:
            return self.ensemble(batch)
        finally:
            self.ensemble.set_member_pass(previous)


def cost(models: dict[str, Any], batches: dict[str, dict], repeats: int) -> dict[str, Any]:
    """Median time of each model on each batch, interleaved, one thread; ratios to ``single``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {"threads": 1, "repeats": repeats}
        for name, batch in batches.items():
            samples: dict[str, list[float]] = {label: [] for label in models}
            for model in models.values():  # warm-up
                timed(model, batch, 1)
            for _ in range(repeats):
                for label, model in models.items():
                    samples[label].append(timed(model, batch, 1))
            medians = {label: float(np.median(v)) for label, v in samples.items()}
            out[name] = {"n_atoms": int(batch["positions"].shape[0]), "seconds": medians,
                         "ratio": {label: medians[label] / medians["one_model"] for label in medians}}
        return out
    finally:
        torch.set_num_threads(threads)


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="uncertainty on held-out data (σ calibrated on the validation split)")
    for column in ("estimator", "test", "n", "ρ struct", "ρ atom", "miscal.", "NLL", "σ_F mean", "|ΔF| mean",
                   "basis", "ρ energy", "σ_F ratio"):
        table.add_column(column, justify="left" if column in ("estimator", "test", "basis") else "right")

    def fmt(value: Any, spec: str = ".3f") -> str:
        return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)

    ratios = next(v for k, v in results.items() if k.startswith("sigma_ratio_vs_"))
    for estimator in ("ensemble", "single"):
        for stem, m in results[estimator].items():
            table.add_row(estimator, stem, str(m["n_structures"]), fmt(m.get("spearman_struct")),
                          fmt(m.get("spearman_atom")), fmt(m.get("miscalibration_area")), fmt(m.get("nll")),
                          fmt(m.get("mean_force_sigma"), ".4f"), fmt(m.get("mean_force_error"), ".4f"),
                          str(m.get("basis", "")), fmt(m.get("energy_spearman")), fmt(ratios[estimator][stem], ".2f"))
    console = Console(width=200)
    console.print(table)
    cost_info = results["cost"]
    for name in COST_CASES:
        ratio = cost_info[name]["ratio"]
        passes = ", ".join(f"{label.split('_')[1]} {ratio[label]:.2f}x" for label in ratio
                           if label.startswith("ensemble_"))
        console.print(f"cost, {name} ({cost_info[name]['n_atoms']} atoms): ensemble {ratio['ensemble']:.2f}x "
                      f"({passes}), single-model {ratio['single']:.2f}x one model "
                      f"(1 thread, median of {cost_info['repeats']})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    work = Path(args.work_dir)
    train = read_configurations(args.train)
    isolated = read_configurations(args.isolated) if args.isolated else []
    split = split_data([*train, *isolated], None, 0.1, args.split_seed)
    budget = args.budget_min * 60.0
    member_seconds = 0.85 * budget / args.members
    uq = UQConfig(method="ensemble", members=args.members, calibration=args.calibration)
    config = UQTrainConfig.model_validate({
        "data": {"train": str(args.train), "e0s": "isolated" if isolated else "fit"}, "model": MODEL,
        "training": training_settings(args, member_seconds), "output": {"directory": str(work)},
        "uq": uq.model_dump()})
    cutoff = MODEL["cutoff"]
    valid_graphs = [config_to_graph(c, cutoff, dtype) for c in split.valid]
    if args.reuse:  # the two model files of an earlier run: evaluate and time again, train nothing
        ensemble, single = (load_model(work / name, device=device) for name in ("ensemble.eqf", "single.eqf"))
        train_seconds = heads_seconds = 0.0
    else:
        t0 = time.perf_counter()
        paths = train_members(split, config, work, progress=False if args.quiet else None, equal_epochs=True)
        train_seconds = time.perf_counter() - t0
        seen = sorted({int(z) for c in [*split.train, *split.valid] for z in c.numbers})
        ensemble = build_ensemble(paths, valid_graphs, uq, seen, [args.seed + m for m in range(args.members)],
                                  device)
        save_uq_model(ensemble, work / "ensemble.eqf")
        t0 = time.perf_counter()
        heads = HeadsConfig(max_time=0.15 * budget)  # its share, whatever the members took
        single = build_uq_potential(ensemble.member(0).to(device),
                                    [config_to_graph(c, cutoff, dtype) for c in split.train], valid_graphs,
                                    method=args.calibration, device=device, seed=args.seed, **heads.model_dump())
        heads_seconds = time.perf_counter() - t0
        save_uq_model(single, work / "single.eqf")

    results: dict[str, Any] = {"ensemble": {}, "single": {}}
    for label, model in (("ensemble", ensemble), ("single", single)):
        parts = []
        for test in args.test:
            configs = read_configurations(test, require_energy=False)
            model.check_elements({int(z) for c in configs for z in c.numbers})
            pred = predict(model, [config_to_graph(c, cutoff, dtype) for c in configs], batch_size=32, device=device)
            results[label][Path(test).stem] = uq_report(pred)
            parts.append(pred)
        results[label]["all"] = uq_report(UQPredictions.concatenate(parts))
        results[label]["valid"] = uq_report(predict(model, valid_graphs, batch_size=32, device=device))

    molecules = read_configurations(args.test[0], require_energy=False)[:16]
    batches = {"molecule": collate([config_to_graph(molecules[0], cutoff, dtype)]),
               "molecules": collate([config_to_graph(c, cutoff, dtype) for c in molecules]),
                "box": collate([config_to_graph(Configuration.from_atoms(ethanol_box()), cutoff, dtype)])}
    batches = {k: to_device(v, device, dtype) for k, v in batches.items()}
    member = ensemble.member(0).to(device)
    reference = Path(args.test[0]).stem  # the in-distribution test file: σ elsewhere relative to it
    results["sigma_ratio_vs_" + reference] = {
        label: {stem: m["mean_force_sigma"] / results[label][reference]["mean_force_sigma"]
                for stem, m in results[label].items()} for label in ("ensemble", "single")}
    models = {"one_model": member, "ensemble": ensemble, "ensemble_batched": MemberPass(ensemble, "batched"),
              "ensemble_sequential": MemberPass(ensemble, "sequential"), "single": single}
    results["cost"] = cost(models, batches, args.repeats)
    results["cost"]["molecule"]["description"] = f"one frame of {Path(args.test[0]).name}"
    results["cost"]["molecules"]["description"] = f"{len(molecules)} frames of {Path(args.test[0]).name}"
    results["cost"]["box"]["description"] = "periodic box of 111 ethanol molecules, 0.79 g/cm³"
    results["cost_ratio_ensemble"] = max(results["cost"][k]["ratio"]["ensemble"] for k in COST_CASES)
    results["cost_ratio_single"] = max(results["cost"][k]["ratio"]["single"] for k in COST_CASES)
    results["meta"] = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "device": str(device), "dtype": args.dtype, "members": args.members, "seed": args.seed, "model": MODEL,
        "budget_min": args.budget_min, "reused_models": args.reuse, "train_seconds": train_seconds,
        "heads_seconds": heads_seconds,
        "n_train": len(split.train), "n_valid": len(split.valid), "calibration": {
            "ensemble": ensemble.calibration.to_json(), "single": single.calibration.to_json()},
        "wall_seconds": time.perf_counter() - wall,
        "notes": "members 1.. train as many epochs as member 0 reached in its time share (capped at twice it); "
                 "cost ratios: the worst of one molecule, the molecule batch and the box; "
                 "spearman_struct/miscalibration_area/nll are force-based where the file has force labels, "
                 "energy-based otherwise (see basis)"}
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training structures (10%% are held out for calibration)")
    p.add_argument("--test", required=True, nargs="+", help="test files (only evaluated)")
    p.add_argument("--isolated", default=None, help="isolated-atom frames for the E0s (default: least-squares fit)")
    p.add_argument("--budget-min", type=positive_float, default=12.0, help="training budget for everything, minutes")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--members", type=positive_int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float64", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--calibration", default="scale", choices=["scale", "isotonic"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7, help="timing repeats (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for training")
    p.add_argument("--work-dir", default="runs/uq", help="member checkpoints and the two UQ model files")
    p.add_argument("--reuse", action="store_true",
                   help="load ensemble.eqf and single.eqf from --work-dir (an earlier run) instead of training: "
                        "evaluation and cost only")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results = run(args)
    if args.out:
        from equiforce.utils.atomic_io import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    run_script(main)

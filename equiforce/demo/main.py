"""``equiforce demo``: the main job end to end on an embedded default, with no data given.

Why: a new user should see, in minutes and on a laptop, every stage a real project goes through —
labelled data, training with validation, test errors against the reference, a model file, and a
molecular-dynamics run with the trained potential checked against the reference along the way.

Systems are registered in :data:`DEMOS`; each takes the output directory, a training budget in minutes
and a seed, and returns a summary dict (also written as ``summary.json``/``summary.md``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from equiforce.errors import ConfigError
from equiforce.utils.atomic_io import atomic_write_text

DemoFn = Callable[..., dict[str, Any]]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_summary(out: Path, summary: dict[str, Any], lines: list[str]) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


def run_cu_ni(out: Path, minutes: float = 4.0, seed: int = 0, n_train: int = 240, n_test: int = 60,
              md_steps: int = 300, progress: bool | None = None) -> dict[str, Any]:
    """EMT Cu/Ni alloy: bulk, surface and vacancy snapshots → potential → test errors → MD checked against EMT."""
    from ase.calculators.emt import EMT

    from equiforce.data.io import read_configurations, write_extxyz
    from equiforce.demo.emt_data import generate_cu_ni_dataset, generate_cu_ni_test_set
    from equiforce.demo.md_check import md_against_reference
    from equiforce.evaluate import evaluate, parity_plot
    from equiforce.models.file import load_model
    from equiforce.train.config import parse_config
    from equiforce.train.trainer import train

    t0 = time.perf_counter()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _say(f"[demo] labelling {n_train} training and {n_test} test structures with EMT (Cu/Ni bulk, surfaces, "
         "vacancies; MD at 300/800/1400 K)")
    train_set = generate_cu_ni_dataset(n_configs=n_train, seed=seed)
    test_set = generate_cu_ni_test_set(n_configs=n_test, seed=seed + 1_000_003)
    write_extxyz(train_set, data_dir / "train.xyz")
    write_extxyz(test_set, data_dir / "test.xyz")
    t_data = time.perf_counter() - t0

    config = {
        "data": {"train": str(data_dir / "train.xyz"), "valid_fraction": 0.1, "e0s": "fit"},
        "model": {"channels": 32, "max_l": 1, "sh_lmax": 3, "correlation": 3, "num_layers": 2, "cutoff": 5.0,
                  "radial_mlp": [32, 32], "num_radial": 8},
        "training": {"epochs": 2000, "batch_size": 4, "lr": 0.01, "scheduler": "plateau", "plateau_patience": 8,
                     "plateau_factor": 0.6, "ema_decay": 0.99, "energy_weight": 10.0, "forces_weight": 10.0,
                     "stress_weight": 100.0, "max_time": 60.0 * minutes, "seed": seed, "device": "cpu",
                     "dtype": "float32"},
        "output": {"directory": str(out / "train"), "resume": False},
    }
    import yaml

    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    _say(f"[demo] training for {minutes:g} min (config: {out / 'config.yaml'}; run it yourself with "
         f"`equiforce train {out / 'config.yaml'}`)")
    result = train(parse_config(config, str(out / "config.yaml")), progress=progress)
    model_path = out / "model.eqf"
    model_path.write_bytes(Path(result["best_model"]).read_bytes())

    model = load_model(model_path)
    test = read_configurations(data_dir / "test.xyz")
    metrics = evaluate(model, test, batch_size=8, device="cpu", keep_values=True)
    values = metrics.pop("values")
    parity_plot({k: v[0] for k, v in values.items()}, {k: v[1] for k, v in values.items()}, out / "parity.png",
                title="equiforce vs EMT on the held-out Cu/Ni test set")
    atomic_write_text(out / "metrics.json", json.dumps({"test": metrics, "train": result}, indent=2,
                                                       default=str) + "\n")

    _say(f"[demo] {md_steps} steps of Langevin MD at 800 K on a 108-atom Cu/Ni alloy with the trained model, "
         "forces checked against EMT along the trajectory")
    md = md_against_reference(model, EMT(), out / "md", steps=md_steps, seed=seed)
    wall = time.perf_counter() - t0

    summary = {"system": "cu-ni", "reference": "ASE EMT", "n_train": result["n_train"], "n_valid": result["n_valid"],
               "n_test": metrics["n_configs"], "epochs": result["epochs"], "best_epoch": result["best_epoch"],
               "test": {k: v for k, v in metrics.items() if k.endswith(("_mae", "_rmse"))}, "md": md,
               "seconds": {"data": t_data, "total": wall}, "model": str(model_path)}
    lines = ["# equiforce demo: Cu/Ni with EMT as the reference", "",
             f"- training data: {result['n_train']} train / {result['n_valid']} validation structures; "
             f"{result['epochs']} epochs in {minutes:g} min (best {result['best_epoch']})",
             f"- test ({metrics['n_configs']} held-out structures): energy {metrics['energy_per_atom_mae']:.2f} "
             f"meV/atom, forces {metrics['forces_mae']:.1f} meV/Å, stress {metrics.get('stress_mae', float('nan')):.2f}"
             " meV/Å³ (MAE)",
             f"- MD: {md['steps']} steps × {md['timestep_fs']} fs at {md['temperature_K']:.0f} K on {md['natoms']} "
             f"atoms; mean temperature {md['mean_temperature_K']:.0f} K; force MAE vs EMT along the trajectory "
             f"{md['force_mae_vs_reference_mev_a']:.1f} meV/Å; {md['ms_per_step']:.0f} ms/step",
             f"- files: model.eqf, parity.png, metrics.json, train/metrics.jsonl, md/trajectory.xyz; "
             f"total {wall / 60:.1f} min"]
    _write_summary(out, summary, lines)
    return summary


def run_ethanol(out: Path, **kwargs: Any) -> dict[str, Any]:
    """Active learning of ethanol with GFN2-xTB (see :mod:`equiforce.demo.ethanol`)."""
    from equiforce.demo.ethanol import run_ethanol as run

    return run(out, **kwargs)


DEMOS: dict[str, DemoFn] = {"ethanol": run_ethanol, "cu-ni": run_cu_ni}
DEFAULT_DEMO = "ethanol"


def run_demo(out: str | Path = "runs/demo", system: str = DEFAULT_DEMO, **kwargs: Any) -> dict[str, Any]:
    """Run the demo named ``system`` into ``out`` and print its summary table."""
    if system not in DEMOS:
        raise ConfigError(f"unknown demo system {system!r}; choose from {sorted(DEMOS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = DEMOS[system](out, **kwargs)
    print((out / "summary.md").read_text(encoding="utf-8"))
    return summary

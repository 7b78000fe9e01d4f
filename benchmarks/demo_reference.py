"""The demo's final model against a model trained on 1,000 random oracle-MD frames, on the demo's test set.

    make demo        # or: equiforce demo (writes runs/demo)
    python benchmarks/demo_reference.py --demo runs/demo --frames 1000 --train-time 600 \
        --out runs/demo_reference.json

The active-learning issue's target: the demo's final model (made from one geometry with a few hundred oracle calls)
has a test force MAE within 2x of a model trained on 1,000 random frames.  The reference frames come
from GFN2-xTB Langevin MD of ethanol at 300/500/800 K (the distribution of the demo's test set, from
separate trajectories: another seed), cached; the reference model has the demo's architecture and training
settings and trains from scratch for ``--train-time`` seconds (5 % of the frames held out for selecting
the best epoch).  Both models are rated on the very test file the demo used (``report.test`` in
``DEMO/learn/config.yaml``).
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

from equiforce.active.config import load_learn_config  # noqa: E402
from equiforce.active.reference import cached_md_set  # noqa: E402
from equiforce.data.io import read_configurations  # noqa: E402
from equiforce.demo.ethanol import ORACLE, train_reference  # noqa: E402
from equiforce.evaluate import evaluate  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

TEMPERATURES = [300.0, 500.0, 800.0]


def demo_inputs(demo: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The demo's final model, its test file and the journaled choice of the final round."""
    model, config = demo / "model.eqf", demo / "learn" / "config.yaml"
    if not model.is_file() or not config.is_file():
        raise SystemExit(f"{demo} holds no finished demo (need model.eqf and learn/config.yaml); run `make demo`")
    test = load_learn_config(config).report.test
    if test is None or not Path(test).is_file():
        raise SystemExit(f"{config}: report.test ({test}) is missing")
    final: dict[str, Any] = {}
    journal = demo / "learn" / "journal.jsonl"
    if journal.is_file():
        records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        final = next((r for r in reversed(records) if r["type"] == "final"), {})
    return model, Path(test), final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output directory")
    parser.add_argument("--frames", type=int, default=1000, help="random oracle-MD frames for the reference")
    parser.add_argument("--train-time", type=float, default=600.0, help="training seconds of the reference")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo_reference"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as the demo's training: a "
                                                                "9-atom molecule gains nothing from more)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo_reference.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ase.build import molecule

    model_path, test_path, final = demo_inputs(args.demo)
    test = read_configurations(test_path)
    t0 = time.perf_counter()
    per_temperature = -(-args.frames // len(TEMPERATURES))
    pool, pool_path = cached_md_set(args.workdir / "cache", molecule("CH3CH2OH"), ORACLE, TEMPERATURES,
                                    per_temperature, interval=40, equilibration=200, seed=args.seed + 202)
    t_data = time.perf_counter() - t0
    frames = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))[:args.frames]]
    result = train_reference(frames, args.workdir / "train", args.train_time, args.seed)
    t_train = time.perf_counter() - t0 - t_data

    demo = evaluate(load_model(model_path), test, device="cpu")
    reference = evaluate(load_model(result["best_model"]), test, device="cpu")
    report = {
        "demo": {"model": str(model_path), "final_round": final.get("round"), "f_mae_mev_a": demo["forces_mae"],
                 "e_mae_mev_atom": demo["energy_per_atom_mae"]},
        "reference": {"frames": len(frames), "pool": str(pool_path), "training_s": args.train_time,
                      "epochs": result["epochs"], "f_mae_mev_a": reference["forces_mae"],
                      "e_mae_mev_atom": reference["energy_per_atom_mae"]},
        "ratio_f_mae": demo["forces_mae"] / reference["forces_mae"], "target_ratio": 2.0,
        "test_file": str(test_path), "n_test": demo["n_configs"], "oracle": "GFN2-xTB (tblite)",
        "seconds": {"pool": t_data, "train": t_train}, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"{'model':<34} {'test F MAE (meV/Å)':>19} {'E MAE (meV/atom)':>17}")
    print(f"{'demo (round ' + str(final.get('round', '?')) + ')':<34} {demo['forces_mae']:>19.1f} "
          f"{demo['energy_per_atom_mae']:>17.2f}")
    print(f"{f'{len(frames)} random MD frames, {args.train_time:g} s':<34} {reference['forces_mae']:>19.1f} "
          f"{reference['energy_per_atom_mae']:>17.2f}")
    print(f"ratio {report['ratio_f_mae']:.2f} (target ≤ 2); wrote {args.out}")


if __name__ == "__main__":
    run_script(main)

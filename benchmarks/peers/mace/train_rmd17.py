"""Train MACE (mace-torch, in benchmarks/peers/.venv-mace) on a prepared split within a wall-clock budget.

Run by ``benchmarks/compare_rmd17.py`` with the peer venv's python; standalone:

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 benchmarks/peers/.venv-mace/bin/python benchmarks/peers/mace/train_rmd17.py \
        --split DIR --budget-min 30 --device cpu --dtype float32 --hidden-irreps 64x0e+64x1o --out mace.json

``DIR`` holds train.xyz / valid.xyz / test.xyz with REF_energy / REF_forces (``benchmarks/rmd17.py
--split-out DIR`` writes them).  MACE's own ``run_train`` does the training with the settings of the
issue (batch 5, lr 0.01, AMSGrad, EMA 0.99, weighted loss 1/100, stage two at 1000/100).  Two hooks make
it budget-aware without changing its algorithm: before each epoch the elapsed training time is checked
(the loop ends cleanly when the next epoch would end more than half an epoch past the budget, and MACE then
saves its models as usual), and stage two starts with the first epoch that begins with 75 % of the budget spent
(the issue's reference run used stage two for its last quarter; equiforce switches by the same rule).
The saved model is then evaluated here on every test frame, as equiforce's benchmark does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class _BudgetSpent(Exception):
    pass


def _install_hooks(budget_s: float, stage_two: float, timing: dict) -> None:
    import mace.tools as tools

    train_module = sys.modules["mace.tools.train"]  # the attribute mace.tools.train is the function

    original_epoch, original_train = train_module.train_one_epoch, tools.train

    def one_epoch(*args, **kwargs):
        elapsed = time.perf_counter() - timing["start"]
        # an epoch cannot be cut short as equiforce's is: run it only if it ends less than half an epoch past the
        # budget, so MACE's loop ends as near the budget as its epochs allow (not up to a whole epoch over)
        if elapsed + 0.5 * timing.get("last_epoch_s", 0.0) >= budget_s:
            raise _BudgetSpent
        t0 = time.perf_counter()
        result = original_epoch(*args, **kwargs)
        timing["last_epoch_s"] = time.perf_counter() - t0
        timing["train_s"] += timing["last_epoch_s"]
        timing["epochs"] += 1
        swa, epoch = timing.get("swa"), kwargs.get("epoch", 0)
        elapsed = time.perf_counter() - timing["start"]
        # decided after the epoch, as equiforce decides before its next one: stage two from the first epoch that
        # starts with 75 % of the budget spent
        if swa is not None and elapsed >= stage_two * budget_s and swa.start > epoch + 1:
            swa.start = epoch + 1  # the loop switches to stage two at its next iteration
        return result

    def train(*args, **kwargs):
        timing["start"] = time.perf_counter()
        timing["swa"] = kwargs.get("swa")
        try:
            return original_train(*args, **kwargs)
        except _BudgetSpent:
            import logging

            logging.info("wall-clock budget spent: training stops here")
        finally:
            timing["loop_s"] = time.perf_counter() - timing["start"]

    train_module.train_one_epoch = one_epoch
    tools.train = train


def _evaluate(model_path: Path, test_file: Path, device: str, dtype: str) -> dict:
    from ase.io import read
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype=dtype)
    e_err, f_err = [], []
    for atoms in read(test_file, index=":"):
        ref_e, ref_f = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
        atoms.calc = calc
        e_err.append(atoms.get_potential_energy() - ref_e)
        f_err.append((atoms.get_forces() - ref_f).ravel())
    e, f = np.asarray(e_err), np.concatenate(f_err)
    return {"e_mae_mev": 1000 * float(np.abs(e).mean()), "e_rmse_mev": 1000 * float(np.sqrt((e**2).mean())),
            "f_mae_mev_a": 1000 * float(np.abs(f).mean()), "f_rmse_mev_a": 1000 * float(np.sqrt((f**2).mean())),
            "n_test": len(e)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, help="directory with train.xyz, valid.xyz, test.xyz")
    p.add_argument("--budget-min", type=float, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--hidden-irreps", default="128x0e+128x1o")
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--stage-two", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="runs/mace")
    p.add_argument("--molecule", default="rmd17")
    p.add_argument("--e0s", default="average",
                   help="MACE's --E0s: 'average' (least squares on the training set, as for rMD17) or a dict "
                        "'{Z: eV, ...}' of isolated-atom energies")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    split, work = Path(args.split).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timing = {"train_s": 0.0, "epochs": 0, "start": time.perf_counter()}
    _install_hooks(args.budget_min * 60.0, args.stage_two, timing)
    name = f"mace_{args.molecule}"
    sys.argv = ["mace_run_train", f"--name={name}", f"--work_dir={work}", f"--train_file={split / 'train.xyz'}",
                f"--valid_file={split / 'valid.xyz'}", "--energy_key=REF_energy", "--forces_key=REF_forces",
                "--model=MACE", f"--hidden_irreps={args.hidden_irreps}", "--r_max=5.0", "--max_ell=3",
                "--correlation=3", "--num_interactions=2", f"--E0s={args.e0s}", f"--batch_size={args.batch_size}",
                "--valid_batch_size=10", "--max_num_epochs=100000", "--lr=0.01", "--amsgrad", "--ema",
                "--ema_decay=0.99", "--swa", "--start_swa=100000", "--swa_lr=0.001", "--energy_weight=1.0",
                "--forces_weight=100.0", "--swa_energy_weight=1000.0", "--swa_forces_weight=100.0",
                f"--default_dtype={args.dtype}", f"--device={args.device}", f"--seed={args.seed}",
                "--eval_interval=1", "--error_table=TotalMAE", "--save_cpu"]
    from mace.cli.run_train import main as run_train

    start = time.perf_counter()
    run_train()
    wall = time.perf_counter() - start
    model_dir = work
    stage_two, stage_one = model_dir / f"{name}_stagetwo.model", model_dir / f"{name}.model"
    model_path = stage_two if stage_two.exists() else stage_one
    t_test = time.perf_counter()
    metrics = _evaluate(model_path, split / "test.xyz", args.device, args.dtype)
    n_train = sum(1 for line in (split / "train.xyz").read_text().splitlines() if "Lattice" in line
                  or "Properties" in line)
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    report = {"engine": "mace", "mace_version": __import__("mace").__version__, "molecule": args.molecule,
              **metrics, "epochs": timing["epochs"], "configs_per_s": n_train * timing["epochs"] /
              max(timing["train_s"], 1e-9), "train_configs_per_s": n_train * timing["epochs"] /
              max(timing["train_s"], 1e-9), "train_s": timing["train_s"], "loop_s": timing.get("loop_s"),
              "test_s": time.perf_counter() - t_test, "wall_s": time.perf_counter() - start, "run_train_s": wall,
              "device": args.device, "dtype": args.dtype, "hidden_irreps": args.hidden_irreps,
              "budget_min": args.budget_min, "model": model_path.name, "model_path": str(model_path),
              "e0s": args.e0s,
              "model_params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

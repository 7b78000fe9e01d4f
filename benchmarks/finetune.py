"""Pretrain on several molecules, fine-tune on a new one with little data: rMD17, leave one molecule out.

    python benchmarks/finetune.py --rmd17 ../shared/data/rmd17 --target aspirin --pretrain-frames 150 \
        --pretrain-min 10 --finetune-frames 50 --finetune-min 3 --out runs/finetune.json

A model (32x0e+32x1o, spherical harmonics to 2, correlation 3, 2 layers, 5 Å, float32) is pretrained for
``--pretrain-min`` minutes on ``--pretrain-frames`` training frames of each rMD17 molecule except the target
(C, H, N, O: the target's elements are covered).  Then, on ``--finetune-frames`` frames of the target
(10 % held out for validation) and ``--finetune-min`` minutes each:

* ``scratch``: a new model of the same architecture, trained on the target frames alone;
* ``pretrained``: the pretrained model as it is (zero-shot; its energies carry the other molecules' offsets);
* ``finetune``: the pretrained model fine-tuned on the target frames;
* ``finetune_replay``: the same with ``--replay-frames`` of the pretraining frames mixed in at
  ``--replay-weight`` (:mod:`equiforce.train.finetune`).

Each is rated on ``--test-frames`` test frames of the target and, for forgetting, on 20 test frames of each
pretraining molecule (``others_*``).  JSON ``arms``: ``f_mae_mev_a``, ``e_mae_mev`` (target) and
``others_f_mae_mev_a``.

``--new-element N`` (with a target that has it: paracetamol, uracil) pretrains only on the molecules without
that element, on a model that does not know it, so fine-tuning must add it
(:func:`equiforce.models.extend.with_elements`); the zero-shot ``pretrained`` arm then has no target numbers.
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

from equiforce.data.io import read_configurations  # noqa: E402
from equiforce.evaluate import evaluate  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.train.finetune import fine_tune  # noqa: E402
from equiforce.train.trainer import train_configs  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.cli_types import positive_float  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "paracetamol",
             "salicylic", "toluene", "uracil")
MODEL = dict(channels=32, max_l=1, sh_lmax=2, correlation=3, num_layers=2, cutoff=5.0, radial_mlp=[32, 32],
             num_radial=8, elements=[1, 6, 7, 8])


def training(minutes: float, lr: float, seed: int) -> dict[str, Any]:
    return {"epochs": 100000, "max_time": 60.0 * minutes, "batch_size": 5, "lr": lr, "scheduler": "cosine",
            "min_lr": lr / 100, "ema_decay": 0.99, "energy_weight": 1.0, "forces_weight": 100.0,
            "device": "cpu", "dtype": "float32", "seed": seed}


def sample(configs: list, n: int, seed: int) -> list:
    return [configs[i] for i in np.random.default_rng(seed).permutation(len(configs))[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rmd17", type=Path, default=Path("../shared/data/rmd17"))
    parser.add_argument("--target", default="aspirin", choices=MOLECULES)
    parser.add_argument("--pretrain-frames", type=int, default=150, help="training frames per other molecule")
    parser.add_argument("--pretrain-min", type=positive_float, default=10.0)
    parser.add_argument("--finetune-frames", type=int, default=50)
    parser.add_argument("--finetune-min", type=positive_float, default=3.0)
    parser.add_argument("--finetune-lr", type=float, default=0.002)
    parser.add_argument("--replay-frames", type=int, default=200)
    parser.add_argument("--replay-weight", type=float, default=0.5)
    parser.add_argument("--test-frames", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune.json"))
    parser.add_argument("--new-element", default=None, metavar="SYMBOL",
                        help="pretrain only on molecules without this element (the model does not know it), so "
                             "that fine-tuning on the target must add it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def read(molecule: str, part: str) -> list:
        return read_configurations(args.rmd17 / f"rmd17_{molecule}_{part}_01.npz", require_forces=True)

    model = dict(MODEL)
    others = [m for m in MOLECULES if m != args.target]
    if args.new_element is not None:
        from ase.data import atomic_numbers

        new = atomic_numbers.get(args.new_element)
        has_it = {m: new in read(m, "test")[0].numbers for m in MOLECULES}
        if not has_it[args.target]:
            parser.error(f"--new-element {args.new_element}: the target {args.target} has no {args.new_element}")
        others = [m for m in others if not has_it[m]]
        model["elements"] = [z for z in MODEL["elements"] if z != new]
    pretrain = [c for m in others for c in sample(read(m, "train"), args.pretrain_frames, args.seed)]
    others_test = [c for m in others for c in sample(read(m, "test"), 20, args.seed)]
    target = sample(read(args.target, "train"), args.finetune_frames, args.seed)
    target_test = sample(read(args.target, "test"), args.test_frames, args.seed)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    pretrained = train_configs(pretrain, None, model, training(args.pretrain_min, 0.01, args.seed),
                               args.workdir / "pretrain", valid_fraction=0.05, progress=False)
    seconds["pretrain"] = time.perf_counter() - t0
    start = pretrained["best_model"]
    runs: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    runs["scratch"] = train_configs(target, None, MODEL, training(args.finetune_min, 0.01, args.seed),
                                    args.workdir / "scratch", valid_fraction=0.1, progress=False)
    runs["pretrained"] = {"best_model": start, "epochs": 0}
    tune = training(args.finetune_min, args.finetune_lr, args.seed)
    runs["finetune"] = fine_tune(start, target, None, tune, args.workdir / "finetune", progress=False)
    runs["finetune_replay"] = fine_tune(start, target, None, tune, args.workdir / "finetune_replay", replay=pretrain,
                                        replay_frames=args.replay_frames, replay_weight=args.replay_weight,
                                        replay_holdout=0.0, progress=False)
    seconds["target_arms"] = time.perf_counter() - t0
    arms: dict[str, Any] = {}
    for name, run in runs.items():
        tuned = load_model(run["best_model"])
        knows_target = set(target_test[0].numbers.tolist()) <= set(tuned.spec.elements)
        on_target = evaluate(tuned, target_test) if knows_target else {"forces_mae": None, "energy_mae": None}
        on_others = evaluate(tuned, others_test)
        arms[name] = {"epochs": run["epochs"], "f_mae_mev_a": on_target["forces_mae"],
                      "e_mae_mev": on_target["energy_mae"], "others_f_mae_mev_a": on_others["forces_mae"],
                      "elements": tuned.spec.elements}
    report = {"benchmark": "finetune", "target": args.target, "pretrain_molecules": others,
              "pretrain_frames": len(pretrain), "pretrain_epochs": pretrained["epochs"],
              "finetune_frames": args.finetune_frames, "finetune_min": args.finetune_min,
              "pretrain_min": args.pretrain_min, "replay_frames": args.replay_frames,
              "replay_weight": args.replay_weight, "n_test": len(target_test), "n_others_test": len(others_test),
              "new_element": args.new_element, "model": model, "arms": arms, "seconds": seconds,
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    header = f"{'arm':<17} {'epochs':>8} {'target F MAE meV/Å':>19} {'target E MAE meV':>17} {'others F MAE meV/Å':>19}"
    print(header)
    print("-" * len(header))
    def cell(value: float | None, width: int) -> str:
        return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

    for name, r in arms.items():
        print(f"{name:<17} {r['epochs']:>8.1f} {cell(r['f_mae_mev_a'], 19)} {cell(r['e_mae_mev'], 17)} "
              f"{cell(r['others_f_mae_mev_a'], 19)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)

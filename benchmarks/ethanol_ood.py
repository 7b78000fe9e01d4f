"""Ethanol out of distribution (BOTNet data set): train on rMD17-like frames, test far from them.

    python benchmarks/ethanol_ood.py --data ../shared/data/ethanol_botnet --budget-min 10 --device cuda \
        --out runs/ethanol_ood/results.json

Trains on ``train.xyz`` (E0s from ``isolated_atoms.xyz``, 5 % held out for validation), reports energy and
force errors on ``test_MD.xyz``, and plots model vs DFT energy curves for ``test_H_removal.xyz`` (vs the
O–H distance), ``test_dimers.xyz`` (one panel per dimer, vs separation) and both normal-mode scans (vs
displacement).  Each curve gets its MAE and a count of *spurious minima*: local minima of the model curve
with no DFT minimum within two grid points — what would trap a simulation in a state that does not exist —
with where each lies and how deep it is (its prominence); ``spurious_minima_deeper_than_kt`` counts those
deeper than kT at 300 K (25.9 meV), the ones that can hold a room-temperature simulation, so a ripple of a
few tenths of a meV near the cutoff is told from a false well.  The curves are evaluated in float64
(``--eval-dtype``) whatever the training precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rmd17: the optimiser options, the peer's split

from rmd17 import add_loss_args, add_optimizer_args, loss_settings, write_split  # noqa: E402

from equiforce.data.graph import config_to_graph  # noqa: E402
from equiforce.data.io import read_configurations  # noqa: E402
from equiforce.data.stats import closest_pairs  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.evaluate import as_graphs, evaluate, resolve_device, run_batches  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.models.potential import Potential, with_short_range_fade, with_zbl_range  # noqa: E402
from equiforce.models.spec import fade_from_closest  # noqa: E402
from equiforce.train.metrics import ErrorMetrics  # noqa: E402
from equiforce.train.trainer import train_configs  # noqa: E402
from equiforce.utils.cli_types import positive_float  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
MACE_PYTHON = PEERS / ".venv-mace" / "bin" / "python"
KT_300K_MEV = 25.85  # spurious minima shallower than kT at 300 K cannot trap a room-temperature simulation
CURVES = (("test_H_removal", "OH_dist", "O–H distance (Å)"), ("test_norm_mode_874", "displacement",
          "displacement along the 874 cm⁻¹ mode"), ("test_norm_mode_3005", "displacement",
          "displacement along the 3005 cm⁻¹ mode"))


def local_minima(y: np.ndarray) -> np.ndarray:
    """Indices of strict interior local minima."""
    return np.where((y[1:-1] < y[:-2]) & (y[1:-1] < y[2:]))[0] + 1


def spurious_minima(model_e: np.ndarray, ref_e: np.ndarray, tolerance: int = 2) -> int:
    """Model minima with no reference minimum within ``tolerance`` grid points."""
    return len(spurious_minima_at(model_e, ref_e, tolerance))


def spurious_minima_at(model_e: np.ndarray, ref_e: np.ndarray, tolerance: int = 2) -> np.ndarray:
    """Indices of the model's spurious minima (see :func:`spurious_minima`)."""
    ref = local_minima(ref_e)
    return np.array([m for m in local_minima(model_e) if not np.any(np.abs(ref - m) <= tolerance)], dtype=int)


def minimum_depths(y: np.ndarray, minima: np.ndarray) -> np.ndarray:
    """How deep each minimum is: its topographic prominence (the smaller of the two rises needed to reach a
    lower point or the curve's end on either side), so a ripple is told from a real false well."""
    from scipy.signal import peak_prominences

    if len(minima) == 0:
        return np.zeros(0)
    return peak_prominences(-np.asarray(y, dtype=float), minima)[0]


def predict_energies(model: Potential, configs: list[Configuration], device: torch.device) -> np.ndarray:
    metrics = ErrorMetrics(keep=True)
    run_batches(model, as_graphs(model, configs), 32, device, metrics, compute_forces=False)
    pred, _ = metrics.values()["energy"]
    return pred


@dataclass
class Scan:
    """One energy curve: which frames of which file, ordered along ``key``."""

    name: str
    file: str
    indices: list[int]  # frames of the file on this curve, in file order
    key: str
    label: str
    dissociation: bool  # H removal and dimers: the far end is the dissociation limit


def scans_of(data: Path) -> tuple[list[Scan], dict[str, list[Configuration]]]:
    """The out-of-distribution scans and the frames of their files."""
    frames = {f"{stem}.xyz": read_configurations(data / f"{stem}.xyz") for stem, _, _ in CURVES}
    scans = [Scan(stem, f"{stem}.xyz", list(range(len(frames[f"{stem}.xyz"]))), key, label, stem == "test_H_removal")
             for stem, key, label in CURVES]
    frames["test_dimers.xyz"] = dimers = read_configurations(data / "test_dimers.xyz")
    for kind in sorted({c.config_type for c in dimers}):
        indices = [i for i, c in enumerate(dimers) if c.config_type == kind]
        scans.append(Scan(f"dimer_{kind}", "test_dimers.xyz", indices, "distance", f"{kind} separation (Å)", True))
    return scans, frames


def curve_metrics(scan: Scan, configs: list[Configuration], energies: np.ndarray,
                  isolated: dict[int, float] | None = None) -> dict[str, Any]:
    """A model's curve against DFT along one scan (``energies``: the model's, for ``configs`` in file order).

    A dissociation scan (H removal, dimers) also gets ``far_aligned_mae_mev``: both curves relative to their
    own value at the largest separation, i.e. the error of the binding curve.  With ``isolated`` (atomic
    number → isolated-atom energy), a dimer curve also reports where each side's far end lies relative to the
    sum of the isolated atoms: a model sits there by construction when its isolated atoms are the E0s, while
    the BOTNet dimer scans (open-shell UHF, lowest state found by basin hopping) end below
    ``isolated_atoms.xyz`` by ~2.0 eV per C and ~3.0 eV per O — an offset that no model trained on these E0s
    can follow, and that the far-aligned MAE leaves out of the comparison.
    """
    x = np.array([float(c.info[scan.key]) for c in configs])
    order = np.argsort(x)
    ref = np.array([c.energy for c in configs])[order]
    pred = np.asarray(energies, dtype=float)[order]
    result = {"x": x[order].tolist(), "dft": ref.tolist(), "model": pred.tolist(), "n": len(x),
              "mae_mev": 1000 * float(np.abs(pred - ref).mean()),
              "shape_mae_mev": 1000 * float(np.abs((pred - pred.min()) - (ref - ref.min())).mean()),
              "dft_minima": len(local_minima(ref))}
    spurious = spurious_minima_at(pred, ref)
    depths = 1000 * minimum_depths(pred, spurious)
    result["spurious_minima"] = len(spurious)
    result["spurious_minima_x"] = x[order][spurious].tolist()
    result["spurious_minima_depth_mev"] = depths.tolist()
    result["spurious_minima_deeper_than_kt"] = int((depths > KT_300K_MEV).sum())
    if scan.dissociation:
        result["far_aligned_mae_mev"] = 1000 * float(np.abs((pred - pred[-1]) - (ref - ref[-1])).mean())
    if isolated is not None and scan.name.startswith("dimer_"):
        atoms_sum = sum(isolated[int(z)] for z in configs[order[-1]].numbers)
        result["dft_far_minus_isolated_ev"] = float(ref[-1] - atoms_sum)
        result["model_far_minus_isolated_ev"] = float(pred[-1] - atoms_sum)
    return result


def run_mace(args: argparse.Namespace, data: Path, work: Path, scans: list[Scan], isolated: dict[int, float]
             ) -> dict[str, Any]:
    """The peer on the same split, budget and device: MACE trained in its own venv on train.xyz (E0s from
    isolated_atoms.xyz, the 5 % held out by the same seeded split as equiforce), then asked for the energies of
    every scan's frames.  ``--peer-reuse`` keeps a finished MACE run in the work directory."""
    from equiforce.data.stats import is_isolated_atom, split_indices

    if not MACE_PYTHON.exists():
        raise SystemExit(f"MACE peer not installed ({MACE_PYTHON}); run benchmarks/peers/mace/install.sh")
    work.mkdir(parents=True, exist_ok=True)
    report = work / "mace.json"
    if not (args.peer_reuse and report.exists()):
        rest = [c for c in read_configurations(data / "train.xyz") if not is_isolated_atom(c)]
        train_idx, valid_idx = split_indices(len(rest), 0.05, 1)  # train_configs' split: same structures
        split = work / "split"
        write_split([rest[i] for i in train_idx], split / "train.xyz")
        write_split([rest[i] for i in valid_idx], split / "valid.xyz")
        write_split(read_configurations(data / "test_MD.xyz"), split / "test.xyz")
        present = {int(z) for c in rest for z in c.numbers}  # MACE wants E0s for exactly its elements
        e0s = {z: e for z, e in isolated.items() if z in present}
        command = [str(MACE_PYTHON), str(PEERS / "mace" / "train_rmd17.py"), "--split", str(split),
                   "--budget-min", str(args.budget_min), "--device", args.device if args.device != "auto" else "cpu",
                   "--dtype", "float64" if args.dtype == "float64" else "float32",
                   "--hidden-irreps", args.mace_hidden_irreps, "--e0s", repr(e0s), "--molecule", "ethanol",
                   "--work-dir", str(work / "run"), "--out", str(report)]
        print("$", " ".join(command), flush=True)
        with open(work / "mace.log", "w", encoding="utf-8") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    trained = json.loads(report.read_text())
    files = sorted({scan.file for scan in scans} | {"test_MD.xyz"})  # test_MD too: rated at --eval-dtype, as ours
    predictions = work / "predictions.json"
    subprocess.run([str(MACE_PYTHON), str(PEERS / "mace" / "predict.py"), "--model", trained["model_path"],
                    "--files", *[str(data / f) for f in files], "--device", trained["device"], "--dtype",
                    args.eval_dtype, "--out", str(predictions)], check=True,
                   env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    predicted = json.loads(predictions.read_text())
    energies = {Path(k).name: np.array(v["energy"]) for k, v in predicted.items()}
    forces = {Path(k).name: [np.array(f) for f in v["forces"]] for k, v in predicted.items()}
    return {"train": trained, "energies": energies, "forces": forces}


def errors_of(configs: list, energies: np.ndarray, forces: list[np.ndarray]) -> dict[str, float]:
    """Test errors of given predictions with equiforce's definitions (energy per structure in meV, force per
    Cartesian component in meV/Å, float64 labels): the peer rated exactly as equiforce is."""
    e_err = np.array([e - c.energy for e, c in zip(energies, configs)])
    f_err = np.concatenate([(f - c.forces).ravel() for f, c in zip(forces, configs)])
    return {"e_mae_mev": 1000 * float(np.abs(e_err).mean()), "f_mae_mev_a": 1000 * float(np.abs(f_err).mean()),
            "e_rmse_mev": 1000 * float(np.sqrt((e_err**2).mean())),
            "f_rmse_mev_a": 1000 * float(np.sqrt((f_err**2).mean())), "n": len(configs)}


def plot(curves: dict[str, dict], labels: dict[str, str], path: Path, peer: dict[str, dict] | None = None,
         peer_name: str = "MACE") -> None:
    from matplotlib.figure import Figure

    names = list(curves)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        c = curves[name]
        ref_min = min(c["dft"])
        ax.plot(c["x"], np.array(c["dft"]) - ref_min, "k-", lw=1.5, label="DFT (PBE)")
        ax.plot(c["x"], np.array(c["model"]) - ref_min, "C1--", lw=1.5, label="equiforce")
        title = f"{name}: MAE {c['mae_mev']:.0f} meV, spurious minima {c['spurious_minima']}"
        if peer is not None:
            ax.plot(peer[name]["x"], np.array(peer[name]["model"]) - ref_min, "C0:", lw=1.5, label=peer_name)
            title = (f"{name}: MAE {c['mae_mev']:.0f} / {peer[name]['mae_mev']:.0f} meV,\nspurious minima "
                     f"{c['spurious_minima']} / {peer[name]['spurious_minima']} (equiforce / {peer_name})")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(labels[name], fontsize=8)
        ax.set_ylabel("E − min E_DFT (eV)", fontsize=8)
        span = max(c["dft"]) - ref_min
        ax.set_ylim(-0.1 * span - 0.1, 1.1 * span + 0.1)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def print_table(title: str, curves: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("curve", "points", "MAE meV", "shape MAE meV", "far-aligned MAE meV", "DFT far − atoms eV",
                   "spurious minima", "of them > kT(300 K) deep", "DFT minima"):
        table.add_column(column, justify="right")
    for name, c in curves.items():
        offset = c.get("dft_far_minus_isolated_ev")
        table.add_row(name, str(c["n"]), f"{c['mae_mev']:.1f}", f"{c['shape_mae_mev']:.1f}",
                      f"{c['far_aligned_mae_mev']:.1f}" if "far_aligned_mae_mev" in c else "",
                      "" if offset is None else f"{offset:+.2f}", str(c["spurious_minima"]),
                      str(c.get("spurious_minima_deeper_than_kt", "")), str(c["dft_minima"]))
    Console().print(table)


def summary(curves: dict[str, dict]) -> dict[str, dict]:
    """The per-curve numbers without the curve data."""
    return {k: {m: v for m, v in c.items() if m not in ("x", "dft", "model")} for k, c in curves.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the ethanol_botnet directory")
    p.add_argument("--budget-min", type=positive_float, default=10.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32", "tf32"])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--max-l", type=int, default=1)
    p.add_argument("--no-zbl", action="store_true", help="no ZBL short-range repulsion prior")
    p.add_argument("--zbl-range", choices=["covalent", "fade", "handover"], default=None,
                   help="where the ZBL prior acts (ModelSpec.zbl_range; default: that of new models): up to the "
                        "covalent-radius sum, only where short_range_fade hands a pair to it (within the covalent "
                        "range), or exactly what the fade hands over; with --model, 'fade' <-> 'handover' re-rates "
                        "the trained model (both give the prior zero on every training pair)")
    p.add_argument("--shift-gate", choices=["coordination", "bonds"], default=None,
                   help="how the per-atom shift switches on (ModelSpec.shift_gate; default: that of new models)")
    p.add_argument("--bond-switch", type=float, nargs=2, default=None, metavar=("ON", "OFF"),
                   help="with --shift-gate bonds: where the bond switch starts and ends, in covalent-radius sums "
                        "(ModelSpec.bond_switch; default: that of new models, 1.0 2.3)")
    p.add_argument("--basis-bound", type=float, default=None,
                   help="bound of the atomic basis before the product (ModelSpec.basis_bound; 0: off; "
                        "default: that of new models, 4)")
    p.add_argument("--short-range-fade", choices=["auto", "off"], default=None,
                   help="fade each element pair out of the network below the shortest distance of train.xyz "
                        "(ModelSpec.short_range_fade; default: that of new models, auto — with the ZBL prior, which "
                        "this script uses unless --no-zbl).  With --model, 'auto' "
                        "adds the fade to a file that has none — the same model training with it would have "
                        "given, since every training pair lies beyond its fade")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=5)
    add_loss_args(p)  # stage two: the last quarter of the budget
    add_optimizer_args(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled training step (training.compile, as rmd17.py; its compilation counts against the "
                        "budget)")
    p.add_argument("--eval-dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the test and the curves, for both engines (default float64: float32 rounding "
                        "of the total energy makes or hides sub-meV local minima on flat parts of a curve)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="runs/ethanol_ood/train")
    p.add_argument("--model", default=None, help="evaluate this model file instead of training")
    p.add_argument("--out", default="runs/ethanol_ood/results.json")
    p.add_argument("--peer", choices=["mace"], default=None,
                   help="also train MACE (benchmarks/peers/.venv-mace) on the same split, budget and device, one "
                        "after the other, and rate it on the same scans")
    p.add_argument("--mace-hidden-irreps", default="64x0e+64x1o", help="the peer's size (equiforce's default size)")
    p.add_argument("--peer-work-dir", default=None,
                   help="MACE's split, run and predictions (default: OUT's folder/mace)")
    p.add_argument("--peer-reuse", action="store_true", help="reuse a finished MACE run in the peer work directory")
    args = p.parse_args(argv)
    if args.peer == "mace" and not MACE_PYTHON.exists():  # said before equiforce trains, not after its budget
        raise SystemExit(f"MACE peer not installed ({MACE_PYTHON}); run benchmarks/peers/mace/install.sh, or leave "
                         "out --peer")
    start = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    device = resolve_device(args.device)
    train_info: dict[str, Any] = {}
    if args.model is None:
        train = read_configurations(data / "train.xyz") + read_configurations(data / "isolated_atoms.xyz")
        model_cfg = dict(channels=args.channels, max_l=args.max_l, sh_lmax=3, correlation=3, num_layers=2,
                         cutoff=5.0, zbl=not args.no_zbl)
        if args.basis_bound is not None:  # else the default of new models (ModelConfig)
            model_cfg["basis_bound"] = args.basis_bound or None
        if args.zbl_range is not None:
            model_cfg["zbl_range"] = args.zbl_range
        if args.shift_gate is not None:
            model_cfg["shift_gate"] = args.shift_gate
        if args.bond_switch is not None:
            model_cfg["bond_switch"] = list(args.bond_switch)
        if args.short_range_fade is not None:
            model_cfg["short_range_fade"] = "auto" if args.short_range_fade == "auto" else None
        training = {"epochs": 100000, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 50,
                    "scheduler": "cosine", "min_lr": args.lr / 100, "ema_decay": 0.99, **loss_settings(args),
                    "stage_two": {"start": 0.75, "lr": args.lr / 10, "energy_weight": args.stage_two_energy_weight},
                    "device": args.device, "dtype": args.dtype, "seed": args.seed, "max_time": 60 * args.budget_min,
                    "compile": args.compile, "optimizer": args.optimizer,
                    "weight_decay": args.weight_decay, "weight_decay_on": args.weight_decay_on}
        result = train_configs(train, None, model_cfg, training, args.work_dir, e0s="isolated", valid_fraction=0.05,
                               split_seed=1, resume=False)
        model_path = result["best_model"]
        train_info = {"epochs": result["epochs"], "best_epoch": result["best_epoch"], "valid": result["valid"],
                      "train_s": result["elapsed"], "model": model_cfg, "training": training}
    else:
        model_path = args.model
    # the curves in float64 whatever the training precision: float32 rounding of a ~ -4000 eV total (steps of
    # 0.24-0.49 meV) makes or hides sub-meV local minima along the flat parts of a curve
    model = load_model(model_path, device=device, dtype=getattr(torch, args.eval_dtype))
    fade_added = (args.model is not None and args.short_range_fade == "auto" and not model.spec.short_range_fade
                  and model.spec.zbl)  # as training does: the fade hands the short range to the ZBL prior
    if fade_added and model.spec.zbl_range in ("fade", "handover"):  # there a fade also moves the prior
        raise SystemExit(f"{model_path}: --short-range-fade auto cannot be added afterwards to a model with "
                         f"zbl_range {model.spec.zbl_range!r} (the fade would also change where its ZBL prior acts)")
    if fade_added:
        graphs = [config_to_graph(c, model.cutoff, torch.float64) for c in read_configurations(data / "train.xyz")]
        model = with_short_range_fade(model, fade_from_closest(closest_pairs(graphs)))
    zbl_range_changed = args.model is not None and args.zbl_range not in (None, model.spec.zbl_range)
    if zbl_range_changed:
        try:
            model = with_zbl_range(model, args.zbl_range)
        except ValueError as err:
            raise SystemExit(f"{model_path}: {err}") from None
    test_configs = read_configurations(data / "test_MD.xyz")
    test = evaluate(model, test_configs, batch_size=50, device=device)
    isolated = {int(c.numbers[0]): float(c.energy) for c in read_configurations(data / "isolated_atoms.xyz")}
    scans, frames = scans_of(data)
    curves: dict[str, dict] = {}
    labels = {scan.name: scan.label for scan in scans}
    for scan in scans:
        configs = [frames[scan.file][i] for i in scan.indices]
        curves[scan.name] = curve_metrics(scan, configs, predict_energies(model, configs, device), isolated)
    peer: dict[str, Any] | None = None
    if args.peer == "mace":
        mace = run_mace(args, data, Path(args.peer_work_dir or out.parent / "mace"), scans, isolated)
        peer_curves = {scan.name: curve_metrics(scan, [frames[scan.file][i] for i in scan.indices],
                                                mace["energies"][scan.file][scan.indices], isolated)
                       for scan in scans}
        trained = mace["train"]
        peer = {"engine": "mace", "mace_version": trained.get("mace_version"),
                "hidden_irreps": trained.get("hidden_irreps"),
                "test_MD": errors_of(test_configs, mace["energies"]["test_MD.xyz"],
                                     mace["forces"]["test_MD.xyz"]),
                "test_MD_in_training_dtype": {k: trained[k] for k in ("e_mae_mev", "f_mae_mev_a", "e_rmse_mev",
                                                                      "f_rmse_mev_a")},
                "curves": summary(peer_curves), "curve_data": peer_curves,
                "train": {k: trained.get(k) for k in ("epochs", "train_s", "configs_per_s", "train_configs_per_s",
                                                      "budget_min", "model_params", "dtype", "device", "date")}}
    plot_path = out.parent / "ethanol_ood_curves.png"
    plot(curves, labels, plot_path, peer["curve_data"] if peer else None)
    report = {"test_MD": {"e_mae_mev": test["energy_mae"], "f_mae_mev_a": test["forces_mae"],
                          "e_rmse_mev": test["energy_rmse"], "f_rmse_mev_a": test["forces_rmse"],
                          "n": test["n_configs"]},
              "curves": summary(curves), "curve_data": curves, "plot": str(plot_path), "train": train_info,
              "device": str(device), "dtype": args.dtype, "eval_dtype": args.eval_dtype,
              "budget_min": args.budget_min if args.model is None else None,
              "model_file": str(model_path), "short_range_fade": model.spec.short_range_fade,
              "short_range_fade_added": fade_added, "zbl_range": model.spec.zbl_range,
              "zbl_range_changed": zbl_range_changed, "wall_s": time.perf_counter() - start,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    engines = {"equiforce": curves}
    if peer is not None:
        report["peer"] = peer
        engines["mace"] = peer_curves
    deep = "spurious_minima_deeper_than_kt"
    report["spurious_minima_total"] = {k: sum(c["spurious_minima"] for c in v.values()) for k, v in engines.items()}
    report[f"{deep}_total"] = {k: sum(c[deep] for c in v.values()) for k, v in engines.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    trained_how = f"{args.budget_min:g} min on {device}" if args.model is None else f"{args.model}, on {device}"
    print_table(f"ethanol OOD, equiforce ({trained_how}): test_MD E MAE {test['energy_mae']:.2f} meV, "
                f"F MAE {test['forces_mae']:.2f} meV/Å", curves)
    if peer is not None:
        print_table(f"ethanol OOD, MACE {peer['mace_version']} ({peer['hidden_irreps']}, {args.budget_min:g} min): "
                    f"test_MD E MAE {peer['test_MD']['e_mae_mev']:.2f} meV, F MAE "
                    f"{peer['test_MD']['f_mae_mev_a']:.2f} meV/Å", peer_curves)
    print(f"plot: {plot_path}")
    return report


if __name__ == "__main__":
    run_script(main)

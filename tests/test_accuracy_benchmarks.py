"""Smoke runs of the accuracy benchmarks (issue 3): tiny data and models; the plumbing, JSON keys and the
dimer-limit diagnostic are checked, not the numbers a real run would give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

import equiforce
from equiforce.models import ModelSpec, build_model
from tests.emt_ethanol import emt_ethanols

ROOT = Path(__file__).resolve().parents[1]
KCAL = 0.0433641  # eV per kcal/mol


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _write_rmd17(path: Path, frames: list[Atoms]) -> None:
    """The rMD17 npz layout (kcal/mol, kcal/mol/Å)."""
    np.savez(path, nuclear_charges=frames[0].numbers.astype(np.uint8),
             coords=np.stack([a.positions for a in frames]),
             energies=np.array([a.get_potential_energy() for a in frames]) / KCAL,
             forces=np.stack([a.get_forces() for a in frames]) / KCAL, old_indices=np.arange(len(frames)))


TINY_MODEL = ["--channels", "4", "--max-l", "1", "--sh-lmax", "2", "--correlation", "2", "--num-layers", "2",
              "--cutoff", "4.0", "--no-compile", "--batch-size", "4", "--max-epochs", "2", "--n-train", "8",
              "--n-valid", "2", "--threads", "1", "--quiet"]


def test_rmd17_benchmark_writes_the_issue_keys(tmp_path):
    train, test = tmp_path / "rmd17_ethanol_train_01.npz", tmp_path / "rmd17_ethanol_test_01.npz"
    _write_rmd17(train, emt_ethanols(12))
    _write_rmd17(test, emt_ethanols(5, seed=100))
    out = tmp_path / "result.json"
    _run("rmd17.py", "--train", str(train), "--test", str(test), "--budget-min", "2", "--device", "cpu",
         "--dtype", "float64", "--out", str(out), "--work-dir", str(tmp_path / "work"), *TINY_MODEL,
         "--shift-gate", "bonds", "--bond-switch", "1.0", "2.3")
    result = json.loads(out.read_text())
    spec = equiforce.load_model(tmp_path / "work" / "best.eqf").spec  # the model options reach the file
    assert spec.shift_gate == "bonds" and tuple(spec.bond_switch) == (1.0, 2.3)
    for key in ("e_mae_mev", "f_mae_mev_a", "e_rmse_mev", "f_rmse_mev_a", "epochs", "configs_per_s", "wall_s",
                "device", "model_params"):
        assert key in result, key
    assert result["epochs"] == 2 and result["device"] == "cpu"
    training = result["training"]  # the measured defaults: AdamW decay on the interaction blocks only, Huber
    assert (training["optimizer"], training["weight_decay"], training["weight_decay_on"]) == ("adamw", 5e-3,
                                                                                          "interactions")
    assert (training["loss"], training["huber_delta"]) == ("huber", 0.01)
    assert result["model_params"] > 0 and 0 < result["configs_per_s"] <= result["train_configs_per_s"]
    assert np.isfinite(result["f_mae_mev_a"]) and result["f_rmse_mev_a"] >= result["f_mae_mev_a"]


def test_compare_rmd17_combines_both_engines_with_ratios(tmp_path):
    """``--only equiforce`` then ``--skip-mace`` with the peer's JSON in place: one table, ratios in the JSON; the
    split written for the peer has the sizes given to equiforce after ``--``."""
    train, test = tmp_path / "rmd17_ethanol_train_01.npz", tmp_path / "rmd17_ethanol_test_01.npz"
    _write_rmd17(train, emt_ethanols(12, rattle=0.03))
    _write_rmd17(test, emt_ethanols(4, seed=5000))
    out = tmp_path / "cmp" / "ethanol.json"
    common = ["--train", str(train), "--test", str(test), "--budget-min", "2", "--device", "cpu", "--out", str(out)]
    _run("compare_rmd17.py", *common, "--only", "equiforce", "--", *TINY_MODEL)
    work = out.parent / out.stem
    assert len(read(work / "split" / "train.xyz", index=":")) == 8 and len(read(work / "split" / "valid.xyz", ":")) == 2
    assert (work / "equiforce.json").exists()
    peer = {"e_mae_mev": 10.0, "f_mae_mev_a": 20.0, "e_rmse_mev": 12.0, "f_rmse_mev_a": 25.0, "epochs": 3,
            "configs_per_s": 5.0, "model_params": 1000}
    (work / "mace.json").write_text(json.dumps(peer))
    done = _run("compare_rmd17.py", *common, "--skip-mace", "--", *TINY_MODEL)
    assert "equiforce / mace" in done.stdout
    result = json.loads(out.read_text())
    assert result["mace"] == peer
    assert result["ratios"]["f_mae_mev_a"] == pytest.approx(result["equiforce"]["f_mae_mev_a"] / 20.0)
    assert "train_configs_per_s" not in result["ratios"]  # an older peer JSON without the column: no ratio


def _botnet_like(directory: Path) -> dict[str, float]:
    """A miniature of ``ethanol_botnet`` whose dimer scans end 1.5 eV per C below the isolated C atom."""
    directory.mkdir()
    isolated = {"H": -13.5, "C": -1025.0, "O": -2035.0, "N": -1479.0}  # N: in the file, never in the data
    atoms_frames = []
    for symbol, energy in isolated.items():
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        atoms_frames.append(atoms)
    write(directory / "isolated_atoms.xyz", atoms_frames)
    write(directory / "test_MD.xyz", emt_ethanols(4))
    for stem, key in (("test_H_removal", "OH_dist"), ("test_norm_mode_874", "displacement"),
                      ("test_norm_mode_3005", "displacement")):
        frames = emt_ethanols(6, seed=10)
        for i, atoms in enumerate(frames):
            atoms.info[key] = 0.9 + 0.2 * i
        write(directory / f"{stem}.xyz", frames)
    dimers = []
    for pair, offset in (("CC", -3.0), ("HO", 0.0)):
        for r in np.linspace(0.8, 4.5, 12):
            atoms = Atoms(pair, positions=[[0, 0, 0], [0, 0, r]])
            energy = sum(isolated[s] for s in pair) + offset - 4.0 * np.exp(-(r - 1.2) ** 2)
            atoms.calc = SinglePointCalculator(atoms, energy=energy)
            atoms.info["distance"], atoms.info["config_type"] = r, pair
            dimers.append(atoms)
    write(directory / "test_dimers.xyz", dimers)
    return isolated


def test_ethanol_ood_reports_curves_and_the_dimer_limit_offsets(tmp_path):
    data = tmp_path / "ethanol_botnet"
    isolated = _botnet_like(data)
    torch.manual_seed(0)
    spec = ModelSpec(elements=[1, 6, 8], channels=4, max_l=1, correlation=2, num_layers=2, radial_mlp=[8],
                     cutoff=4.0, avg_num_neighbors=8.0, zbl=True, basis_bound=4.0,
                     e0s={1: isolated["H"], 6: isolated["C"], 8: isolated["O"]})
    model = equiforce.save_model(build_model(spec), tmp_path / "m.eqf")
    out = tmp_path / "ood" / "results.json"
    done = _run("ethanol_ood.py", "--data", str(data), "--model", str(model), "--device", "cpu", "--out", str(out))
    assert "far-aligned" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["test_MD"]) >= {"e_mae_mev", "f_mae_mev_a", "n"} and result["test_MD"]["n"] == 4
    assert set(result["curves"]) == {"test_H_removal", "test_norm_mode_874", "test_norm_mode_3005", "dimer_CC",
                                     "dimer_HO"}
    assert Path(result["plot"]).exists()
    cc, ho = result["curves"]["dimer_CC"], result["curves"]["dimer_HO"]
    # the scans end at 4.5 Å, where the DFT-like curve is offset + a negligible tail of the Gaussian well
    assert cc["dft_far_minus_isolated_ev"] == pytest.approx(-3.0, abs=1e-3)
    assert ho["dft_far_minus_isolated_ev"] == pytest.approx(0.0, abs=1e-3)
    # beyond the model's 4 Å cutoff both atoms are isolated: exactly the E0s
    assert cc["model_far_minus_isolated_ev"] == pytest.approx(0.0, abs=1e-6)
    for name, c in result["curves"].items():
        assert {"mae_mev", "shape_mae_mev", "spurious_minima", "dft_minima", "spurious_minima_deeper_than_kt",
                "spurious_minima_depth_mev", "spurious_minima_x"} <= set(c)
        assert len(c["spurious_minima_x"]) == len(c["spurious_minima_depth_mev"]) == c["spurious_minima"]
        assert ("far_aligned_mae_mev" in c) == (not name.startswith("test_norm_mode"))
    assert set(result["spurious_minima_total"]) == set(result["spurious_minima_deeper_than_kt_total"]) == {"equiforce"}
    assert result["eval_dtype"] == "float64"
    assert "dft_far_minus_isolated_ev" not in result["curves"]["test_H_removal"]


def test_spurious_minima_are_located_and_their_depth_measured():
    """A false well on the rising side of a dissociation curve and a 0.2-meV ripple on its plateau both count as
    spurious minima; each gets where it lies and its depth (prominence), which tells them apart."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ethanol_ood import minimum_depths, spurious_minima, spurious_minima_at

    x = np.linspace(0.8, 5.0, 85)
    dft = 4.0 * (1 - np.exp(-2.0 * (x - 1.1))) ** 2  # a Morse curve: one minimum at 1.1 Å
    model = np.where(x < 4.0, dft, dft[x < 4.0][-1])  # a model flat beyond 4 Å...
    model = model - 0.5 * np.exp(-((x - 2.5) / 0.1) ** 2)  # ...with a false well at 2.5 Å
    model = model + np.where(np.abs(x - 4.5) < 0.03, -2e-4, 0.0)  # and a ripple at 4.5 Å
    at = spurious_minima_at(model, dft)
    assert spurious_minima(model, dft) == 2 and x[at] == pytest.approx([2.5, 4.5], abs=0.03)
    depths = minimum_depths(model, at)
    assert 0.2 < depths[0] < 0.5 and depths[1] == pytest.approx(2e-4, rel=1e-6)
    assert len(minimum_depths(dft, spurious_minima_at(dft, dft))) == 0


MACE_PYTHON = ROOT / "benchmarks" / "peers" / ".venv-mace" / "bin" / "python"


@pytest.mark.skipif(not MACE_PYTHON.exists(), reason="the MACE peer venv is not installed "
                                                     "(benchmarks/peers/mace/install.sh)")
def test_ethanol_ood_rates_the_mace_peer_on_the_same_scans(tmp_path):
    data = tmp_path / "ethanol_botnet"
    _botnet_like(data)
    write(data / "train.xyz", emt_ethanols(24, seed=300))
    out = tmp_path / "ood" / "results.json"
    _run("ethanol_ood.py", "--data", str(data), "--budget-min", "0.05", "--device", "cpu", "--dtype", "float32",
         "--channels", "8", "--batch-size", "8", "--no-compile", "--peer", "mace", "--mace-hidden-irreps", "8x0e+8x1o",
         "--work-dir", str(tmp_path / "eq"), "--out", str(out))
    result = json.loads(out.read_text())
    peer = result["peer"]
    assert peer["engine"] == "mace" and peer["test_MD"]["n"] == 4 and peer["train"]["epochs"] >= 1
    assert set(peer["curves"]) == set(result["curves"])
    for name, c in peer["curves"].items():  # rated exactly as equiforce: same points, same DFT
        assert c["n"] == result["curves"][name]["n"] and c["dft_minima"] == result["curves"][name]["dft_minima"]
    assert peer["curve_data"]["dimer_CC"]["dft"] == result["curve_data"]["dimer_CC"]["dft"]
    assert set(result["spurious_minima_total"]) == {"equiforce", "mace"}
    # MACE with E0s from the isolated atoms: its dimers also end at their sum beyond the cutoff
    assert abs(peer["curves"]["dimer_HO"]["model_far_minus_isolated_ev"]) < 1.0

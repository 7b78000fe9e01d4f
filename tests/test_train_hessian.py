"""Training on Hessian labels: the products H·v equal the full Hessian's, labels round-trip through extxyz with
clear errors for bad ones, and training on Hessians lowers the Hessian and frequency errors it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from equiforce.data import collate, config_to_graph
from equiforce.data import keys as K
from equiforce.data.io import read_configurations, write_extxyz
from equiforce.data.structure import Configuration
from equiforce.errors import DataError
from equiforce.evaluate import evaluate
from equiforce.sim.hessian import hessian
from equiforce.train.hessian_loss import hessian_vector_products
from equiforce.train.loss import WeightedLoss
from equiforce.train.trainer import train_configs
from tests.conftest import make_model
from tests.uq_helpers import single_thread  # noqa: F401

SMALL = dict(channels=8, radial_mlp=[16], num_layers=2, max_l=1, sh_lmax=2, correlation=2, cutoff=4.0)


def teacher_labelled(n: int, seed: int, teacher) -> list[Configuration]:
    """Rattled small molecules with energy, forces and the exact Hessian of a random teacher model."""
    rng = np.random.default_rng(seed)
    names = ("H2O", "CH4", "CH3OH", "HCOOH")
    out = []
    for i in range(n):
        atoms = molecule(names[i % len(names)])
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        graph = collate([config_to_graph(Configuration.from_atoms(atoms), teacher.cutoff)])
        pred = teacher(graph, compute_forces=True)
        out.append(Configuration.from_atoms(atoms, energy=float(pred[K.ENERGY].detach().sum()),
                                            forces=pred[K.FORCES].detach().numpy(), hessian=hessian(teacher, atoms),
                                            source="teacher", frame=i))
    return out


@pytest.fixture(scope="module")
def teacher():
    return make_model("small", seed=7)


def test_model_products_equal_the_full_hessian_and_labels_of_itself_give_zero_loss(teacher):
    configs = teacher_labelled(3, seed=0, teacher=teacher)
    batch = collate([config_to_graph(c, teacher.cutoff) for c in configs])
    batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
    pred = teacher(batch, compute_forces=True, create_graph=True)
    products = hessian_vector_products(pred[K.FORCES], batch[K.POSITIONS], batch, n_vectors=2,
                                       generator=torch.Generator().manual_seed(0))
    assert products[K.HESSIAN_VP].shape == (2, batch[K.POSITIONS].shape[0], 3)
    torch.testing.assert_close(products[K.HESSIAN_VP], products[K.HESSIAN_VP_REF], rtol=1e-9, atol=1e-9)
    loss = WeightedLoss(hessian_weight=1.0).components({**pred, **products}, batch)
    assert float(loss["hessian"].detach()) < 1e-16
    # a label that differs from the model's Hessian gives a loss whose gradient reaches the parameters
    configs[1].hessian = configs[1].hessian + np.eye(configs[1].hessian.shape[0])
    batch = collate([config_to_graph(c, teacher.cutoff) for c in configs])
    batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
    pred = teacher(batch, compute_forces=True, create_graph=True)
    products = hessian_vector_products(pred[K.FORCES], batch[K.POSITIONS], batch, generator=torch.Generator())
    loss = WeightedLoss(hessian_weight=1.0).components({**pred, **products}, batch)["hessian"]
    assert float(loss.detach()) > 0.1
    grads = torch.autograd.grad(loss, [p for p in teacher.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    # the mask: only the atoms of the labelled structures count
    configs[0].hessian = None
    batch = collate([config_to_graph(c, teacher.cutoff) for c in configs])
    n0 = configs[0].n_atoms
    batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
    pred = teacher(batch, compute_forces=True, create_graph=True)
    products = hessian_vector_products(pred[K.FORCES], batch[K.POSITIONS], batch)
    assert products[K.HESSIAN_VP_MASK][:n0].sum() == 0 and products[K.HESSIAN_VP_MASK][n0:].sum() > 0


def test_hessians_round_trip_through_extxyz_and_bad_ones_are_named(tmp_path, teacher):
    configs = teacher_labelled(2, seed=1, teacher=teacher)
    configs[1].hessian = None
    path = tmp_path / "h.xyz"
    write_extxyz(configs, path)
    back = read_configurations(path)
    np.testing.assert_allclose(back[0].hessian, configs[0].hessian, atol=1e-7)  # extxyz: 8 decimals, as forces
    assert back[1].hessian is None and "hessian" not in back[0].info
    # the [3N, 3N] matrix in info, under another key
    from ase.io import read, write

    atoms = read(path, index=0)
    del atoms.arrays["hessian"]
    atoms.info["H"] = configs[0].hessian
    write(tmp_path / "info.xyz", atoms)
    np.testing.assert_allclose(read_configurations(tmp_path / "info.xyz", hessian_key="H")[0].hessian,
                               configs[0].hessian, atol=1e-7)  # extxyz writes info with 8 decimals
    n = len(atoms)
    atoms.info["H"] = np.zeros((3 * n, 3 * n - 1))
    write(tmp_path / "bad.xyz", [atoms.copy(), atoms])
    with pytest.raises(DataError, match=r"bad.xyz, frame 0, field 'H': a Hessian needs") as err:
        read_configurations(tmp_path / "bad.xyz", hessian_key="H", require_energy=False)
    assert f"{9 * n * n} values" in str(err.value)
    skew = np.zeros((3 * n, 3 * n))
    skew[0, 1] = 5.0
    atoms.info["H"] = skew
    write(tmp_path / "skew.xyz", atoms)
    with pytest.raises(DataError, match="not symmetric"):
        read_configurations(tmp_path / "skew.xyz", hessian_key="H", require_energy=False)


def test_training_on_hessians_lowers_the_hessian_error(tmp_path, teacher):
    train = teacher_labelled(12, seed=2, teacher=teacher)
    test = teacher_labelled(4, seed=3, teacher=teacher)
    training = dict(epochs=25, batch_size=4, lr=0.01, device="cpu", seed=0, ema_decay=0.0, hessian_vectors=2)
    results = {}
    for weight in (0.0, 1.0):
        result = train_configs(train, None, SMALL, {**training, "hessian_weight": weight}, tmp_path / f"w{weight}",
                               valid_fraction=0.25, test=test, progress=False)
        results[weight] = result
    without, with_hessians = results[0.0]["test"], results[1.0]["test"]
    assert with_hessians["n_hessians"] == 4
    # measured: Hessian MAE 127 against 196 meV/Å², frequencies 75 against 161 cm⁻¹, forces 35 against 66 meV/Å
    assert with_hessians["hessian_mae"] < 0.85 * without["hessian_mae"]
    assert with_hessians["frequency_mae_cm"] < 0.8 * without["frequency_mae_cm"]
    # the Hessian term was trained and validated
    import json

    records = [json.loads(line) for line in (tmp_path / "w1.0" / "metrics.jsonl").read_text().splitlines()]
    assert "train_loss_hessian" in records[0] and "valid_hessian_vp_mae" in records[0]
    assert records[-1]["valid_hessian_vp_mae"] < records[0]["valid_hessian_vp_mae"]


def test_evaluate_reports_full_hessian_and_frequency_errors(teacher):
    configs = teacher_labelled(2, seed=4, teacher=teacher)
    own = evaluate(teacher, configs)
    assert own["n_hessians"] == 2 and own["hessian_mae"] < 1e-6 and own["frequency_mae_cm"] < 1e-3
    other = evaluate(make_model("small", seed=8), configs)
    assert other["hessian_mae"] > 1.0 and other["frequency_mae_cm"] > 1.0


def test_compiled_training_refuses_hessians_clearly(tmp_path, teacher):
    train = teacher_labelled(4, seed=5, teacher=teacher)
    with pytest.raises(ValueError, match="Hessians needs compile: false"):
        train_configs(train, None, SMALL, dict(epochs=1, device="cpu", compile=True), tmp_path / "c",
                      valid_fraction=0.25, progress=False)


def test_finite_difference_labels_match_the_analytic_hessian(teacher):
    import equiforce
    from equiforce.data.hessian_labels import finite_difference_hessian

    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=3)
    numeric = finite_difference_hessian(atoms, equiforce.Calculator(teacher), delta=0.002)
    np.testing.assert_allclose(numeric, hessian(teacher, atoms), atol=1e-4 * np.abs(numeric).max())
    with pytest.raises(ValueError, match="delta must be positive"):
        finite_difference_hessian(atoms, equiforce.Calculator(teacher), delta=0.0)


def test_hessian_training_benchmark_smoke(tmp_path):
    """The benchmark's plumbing with GFN2-xTB at toy sizes (numbers are not checked)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("tblite")
    out = tmp_path / "h.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hessian_training.py"
    subprocess.run([sys.executable, str(script), "--frames", "2", "--pool-frames", "6", "--test-frames", "3",
                    "--train-time", "3", "--equilibration", "5", "--interval", "3", "--workdir", str(tmp_path / "w"),
                    "--loss", "mse", "--huber-delta", "0.02", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert (report["loss"], report["huber_delta"]) == ("mse", 0.02)
    arms = report["arms"]
    assert set(arms) == {"forces", "forces_hessians", "forces_equal_calls", "forces_equal_analytic_cost"}
    assert arms["forces_equal_analytic_cost"]["frames"] == min(6, round(2 * 4.2))  # capped by the pool
    assert arms["forces_hessians"]["oracle_calls"] == 2 * (1 + 6 * 9) and arms["forces_equal_calls"]["frames"] == 6
    for arm in arms.values():
        assert arm["f_mae_mev_a"] > 0 and arm["frequency_mae_cm"] > 0 and arm["hessian_mae"] > 0


def test_hessian_label_uses_an_analytic_hessian_when_the_calculator_has_one(teacher):
    import equiforce
    from equiforce.data.hessian_labels import hessian_label

    atoms = molecule("H2O")
    atoms.rattle(0.03, seed=1)
    numeric, how = hessian_label(atoms, equiforce.Calculator(teacher), delta=0.002)
    assert how == "finite-difference"
    np.testing.assert_allclose(numeric, hessian(teacher, atoms), atol=1e-3 * np.abs(numeric).max())
    pytest.importorskip("pyscf")
    from equiforce.active.pyscf_calc import PySCFCalculator

    dft = PySCFCalculator(xc="PBE", basis="sto-3g", density_fit=False, conv_tol=1e-11)
    analytic, how = hessian_label(atoms, dft)
    assert how == "analytic" and analytic.shape == (9, 9)
    from equiforce.data.hessian_labels import finite_difference_hessian

    reference = finite_difference_hessian(atoms, dft, delta=0.005)
    np.testing.assert_allclose(analytic, reference, atol=0.01 * np.abs(reference).max())


def test_cli_eval_reports_hessian_and_frequency_rows(tmp_path, teacher, capsys):
    import json

    from equiforce.cli import main
    from equiforce.models.file import save_model

    configs = teacher_labelled(2, seed=6, teacher=teacher)
    write_extxyz(configs, tmp_path / "h.xyz")
    model = save_model(make_model("small", seed=9), tmp_path / "m.eqf")
    assert main(["eval", str(model), str(tmp_path / "h.xyz"), "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Hessian entries" in printed and "harmonic frequencies" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["n_hessians"] == 2 and metrics["hessian_mae"] > 0 and metrics["frequency_mae_cm"] > 0


def test_resume_with_hessians_is_exact(tmp_path, teacher):
    """The random vectors are seeded by the run's seed and step: a killed and resumed run ends bit-identical."""
    from safetensors.torch import load_file

    train = teacher_labelled(6, seed=7, teacher=teacher)
    training = dict(epochs=4, batch_size=2, lr=0.01, device="cpu", seed=1, hessian_vectors=2)

    class Killed(Exception):
        pass

    def kill_after_2(record):
        if record["epoch"] == 2:
            raise Killed

    straight = train_configs(train, None, SMALL, training, tmp_path / "a", valid_fraction=0.34, progress=False)
    with pytest.raises(Killed):
        train_configs(train, None, SMALL, training, tmp_path / "b", valid_fraction=0.34, progress=False,
                      epoch_callback=kill_after_2)
    resumed = train_configs(train, None, SMALL, training, tmp_path / "b", valid_fraction=0.34, progress=False)
    assert resumed["resumed_from"] == 2
    ours, theirs = load_file(tmp_path / "b" / "last.eqf"), load_file(tmp_path / "a" / "last.eqf")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert resumed["valid"] == straight["valid"] and "hessian_vp_mae" in straight["valid"]


def test_hessian_vectors_leave_the_shuffling_stream_alone(tmp_path, teacher):
    """Under DDP every rank must shuffle alike; drawing Hessian vectors (as many as a rank's batches have atoms)
    from the shuffling generator made the ranks' orders drift apart (overlapping data, or a hang)."""
    from equiforce.train.checkpoint import load_checkpoint
    from equiforce.train.trainer import _hessian_seed

    train = teacher_labelled(6, seed=7, teacher=teacher)
    training = dict(epochs=1, batch_size=2, lr=0.01, device="cpu", seed=3, hessian_vectors=2)
    result = train_configs(train, None, SMALL, training, tmp_path / "run", valid_fraction=0.34, progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["rng"]["shuffle"]
    expected = torch.Generator().manual_seed(3)
    torch.randperm(result["n_train"], generator=expected)  # one epoch: one shuffle, and nothing else drawn
    assert torch.equal(saved, expected.get_state())
    assert len({_hessian_seed(3, step, rank) for step in range(50) for rank in range(4)}) == 200

"""Training: config errors name the key and file, the loss falls, outputs are written, resume is exact,
checkpoints hold no pickle, and the CLI evaluates models and fails cleanly on bad configs."""

from __future__ import annotations

import hashlib
import json
import pickle  # noqa: S403  (used only to craft a payload that must be refused)
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from safetensors import safe_open
from safetensors.torch import load_file

from equiforce.cli import main
from equiforce.data import collate, config_to_graph
from equiforce.data import keys as K
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, ModelFileError
from equiforce.models.file import load_model, read_header
from equiforce.train.checkpoint import load_checkpoint, save_checkpoint
from equiforce.train.config import load_config
from equiforce.train.ema import EMA
from equiforce.train.loss import WeightedLoss
from equiforce.train.trainer import train
from tests.conftest import make_model

MODEL = dict(channels=8, radial_mlp=[16], num_layers=2, max_l=1, sh_lmax=2, correlation=2, cutoff=4.0)
EPOCHS = 6


def emt_frames(n: int, seed: int) -> list:
    """Rattled, strained 4-atom Cu/Ni fcc cells labelled by EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[rng.random(len(atoms)) < 0.5] = 28
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        atoms.rattle(0.1, seed=seed * 1000 + i)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write(path / "train.xyz", emt_frames(20, seed=1), format="extxyz")
    write(path / "test.xyz", emt_frames(4, seed=2), format="extxyz")
    return path


def write_config(path: Path, data_dir: Path, out_dir: Path, **training) -> Path:
    config = {"data": {"train": str(data_dir / "train.xyz"), "test": str(data_dir / "test.xyz"), "valid_fraction": 0.2},
              "model": MODEL,
              "training": {"epochs": EPOCHS, "batch_size": 4, "lr": 0.01, "device": "cpu", "seed": 3, **training},
              "output": {"directory": str(out_dir)}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    config = load_config(write_config(root / "config.yaml", data_dir, out))
    return config, train(config, progress=False), out


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path, data_dir):
    path = write_config(tmp_path / "config.yaml", data_dir, tmp_path / "out", lerning_rate=0.1)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "config.yaml" in message and "training.lerning_rate" in message
    assert "Extra inputs are not permitted" in message
    config = yaml.safe_load(path.read_text())
    config["training"].pop("lerning_rate")
    config["model"]["e0s"] = {29: -1.0}
    config["data"]["e0s"] = "guess"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"data\.e0s: must be 'fit', 'isolated'.*model: e0s is computed"):
        load_config(path)


def test_training_learns_and_writes_outputs(reference, data_dir):
    config, result, out = reference
    for name in ("best.eqf", "last.eqf", "metrics.jsonl", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for key in ("lr", "train_loss", "valid_loss", "valid_energy_per_atom_mae", "valid_forces_rmse",
                "valid_stress_mae", "time"):
        assert key in records[0], key
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert result["epochs"] == EPOCHS and 1 <= result["best_epoch"] <= EPOCHS
    assert result["n_train"] == 16 and result["n_valid"] == 4
    assert result["test"]["n_configs"] == 4 and result["test"]["forces_mae"] > 0

    header = read_header(out / "best.eqf")
    extra = header["extra"]
    assert extra["data"]["train_sha256"] == hashlib.sha256((data_dir / "train.xyz").read_bytes()).hexdigest()
    assert extra["config"]["training"]["lr"] == config.training.lr
    assert extra["training"]["epoch"] == result["best_epoch"]
    assert header["spec"]["elements"] == [28, 29] and header["spec"]["channels"] == 8
    model = load_model(out / "best.eqf")
    assert model.spec.energy_scale != 1.0 and model.spec.avg_num_neighbors > 1


class _Killed(Exception):
    pass


def test_resume_is_exact(reference, data_dir, tmp_path):
    _, ref_result, ref_out = reference
    out = tmp_path / "run"
    config = load_config(write_config(tmp_path / "config.yaml", data_dir, out))

    def kill_after_3(record):
        if record["epoch"] == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(config, progress=False, epoch_callback=kill_after_3)
    assert load_checkpoint(out / "checkpoint.safetensors")["progress"]["epoch"] == 3

    result = train(config, progress=False)
    assert result["resumed_from"] == 3
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    for name in ("last.eqf", "best.eqf", "checkpoint.safetensors"):
        ours, theirs = load_file(out / name), load_file(ref_out / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert result["valid"] == ref_result["valid"]

    log = (out / "metrics.jsonl").read_text()
    again = train(config, progress=False)  # finished: nothing more to do
    assert again["resumed_from"] == EPOCHS and (out / "metrics.jsonl").read_text() == log


def test_resume_with_another_architecture_names_what_changed(tmp_path, data_dir):
    """A checkpoint of another model is refused, naming each changed field (e.g. a new default the config
    did not pin), and pinning the old value in the config resumes."""
    out = tmp_path / "run"
    first = yaml.safe_load(write_config(tmp_path / "config.yaml", data_dir, out, epochs=1).read_text())
    first["model"] = {**MODEL, "shift_gate": "coordination", "bond_switch": [1.3, 1.8]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(first))
    train(load_config(tmp_path / "config.yaml"), progress=False)
    changed = {**first, "model": dict(MODEL), "training": {**first["training"], "epochs": 2}}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match=r"model\.shift_gate: 'coordination' → 'bonds'.*model\.bond_switch"):
        train(load_config(tmp_path / "changed.yaml"), progress=False)
    pinned = {**first, "training": {**first["training"], "epochs": 2}}
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump(pinned))
    assert train(load_config(tmp_path / "pinned.yaml"), progress=False)["resumed_from"] == 1


def test_resume_with_other_settings_or_data_is_refused(tmp_path, data_dir):
    """A resumed run may go on longer (epochs, max_time) but not train on other batches, loss weights, seed or data:
    it would be neither the run it continues nor the one its config describes."""
    out = tmp_path / "run"
    train(load_config(write_config(tmp_path / "config.yaml", data_dir, out, epochs=1)), progress=False)
    for change, name in (({"batch_size": 2}, "training.batch_size: 4 → 2"), ({"seed": 4}, "training.seed: 3 → 4"),
                         ({"forces_weight": 5.0}, "training.forces_weight")):
        path = write_config(tmp_path / "changed.yaml", data_dir, out, epochs=2, **change)
        with pytest.raises(ConfigError, match=name):
            train(load_config(path), progress=False)
    frames = read(data_dir / "train.xyz", index=":")  # the same structures in another order: other batches
    write(tmp_path / "reordered.xyz", frames[::-1], format="extxyz")
    config = yaml.safe_load(write_config(tmp_path / "changed.yaml", data_dir, out, epochs=2).read_text())
    config["data"]["train"] = str(tmp_path / "reordered.xyz")
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="other (training|validation) data"):
        train(load_config(tmp_path / "changed.yaml"), progress=False)
    path = write_config(tmp_path / "longer.yaml", data_dir, out, epochs=2, max_epochs_without_improvement=5)
    assert train(load_config(path), progress=False)["resumed_from"] == 1


def test_a_directory_another_process_trains_into_is_refused(tmp_path, data_dir):
    from equiforce.utils.locking import RunInUseError, exclusive_lock, release

    out = tmp_path / "run"
    lock = exclusive_lock(out / "train.lock", "a test")  # as a second terminal's run would hold it
    try:
        with pytest.raises(RunInUseError, match="in use by another process"):
            train(load_config(write_config(tmp_path / "config.yaml", data_dir, out, epochs=1)), progress=False)
    finally:
        release(lock)
    assert not (out / "metrics.jsonl").exists()


def test_a_best_model_of_an_epoch_the_checkpoint_does_not_hold_is_dropped(reference, tmp_path):
    """A new best waits in best.eqf.next until the checkpoint that records it: killed in between, the resumed run
    redoes that epoch, and the pending file of the discarded epoch must not become best.eqf."""
    from equiforce.models.file import load_model, read_header, save_model
    from equiforce.train.trainer import promote_best

    _, result, out = reference
    best = load_model(out / "best.eqf")
    epoch = read_header(out / "best.eqf")["extra"]["training"]["epoch"]
    assert not (out / "best.eqf.next").exists() and epoch == result["best_epoch"]
    run = tmp_path / "run"
    save_model(best, run / "best.eqf", extra={"training": {"epoch": 2}})
    save_model(best, run / "best.eqf.next", extra={"training": {"epoch": 4}})  # epoch 4: after the checkpoint
    promote_best(run, best_epoch=2)
    assert not (run / "best.eqf.next").exists() and read_header(run / "best.eqf")["extra"]["training"]["epoch"] == 2
    save_model(best, run / "best.eqf.next", extra={"training": {"epoch": 5}})  # recorded by the checkpoint
    promote_best(run, best_epoch=5)
    assert read_header(run / "best.eqf")["extra"]["training"]["epoch"] == 5
    (run / "best.eqf.next").write_bytes(b"cut short")  # a write killed mid-way never counts
    promote_best(run, best_epoch=5)
    assert not (run / "best.eqf.next").exists()


def test_checkpoint_is_pickle_free(reference, tmp_path, monkeypatch):
    _, _, out = reference
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["format"] == "equiforce-checkpoint"
    assert any(k.startswith("optimizer/state/") for k in keys) and "rng/torch" in keys
    structure = json.loads(metadata["structure"])
    assert structure["progress"]["epoch"] == EPOCHS
    assert structure["training"]["lr"] == 0.01

    state = {"a": {1: torch.arange(3), "b": (1.5, None, float("inf"))}, "c": [np.arange(2, dtype=np.uint32), "s"]}
    save_checkpoint(tmp_path / "small.safetensors", state)
    back = load_checkpoint(tmp_path / "small.safetensors")
    assert torch.equal(back["a"][1], torch.arange(3)) and back["a"]["b"] == (1.5, None, float("inf"))
    assert back["c"][1] == "s" and back["c"][0].dtype == np.uint32

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"state": Exploit()}))
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_checkpoint(tmp_path / "evil.safetensors")
    assert not (tmp_path / "PWNED").exists()


def test_cli_eval_prints_metrics_and_writes_plot(reference, data_dir, tmp_path, capsys):
    _, _, out = reference
    code = main(["eval", str(out / "best.eqf"), str(data_dir / "test.xyz"), "--out", str(tmp_path / "eval"),
                 "--device", "cpu", "--batch-size", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "forces" in printed and "meV/Å" in printed
    assert (tmp_path / "eval" / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["n_configs"] == 4 and report["metrics"]["forces_mae"] > 0
    assert "by_config_type" not in report  # one type: nothing to break down


def test_cli_eval_breaks_errors_down_by_config_type(reference, data_dir, tmp_path, capsys):
    from ase.io import read, write

    _, _, out = reference
    frames = read(data_dir / "test.xyz", ":")
    for k, atoms in enumerate(frames):
        atoms.info["config_type"] = "md300K" if k < 3 else "md800K"
    write(tmp_path / "typed.xyz", frames)
    assert main(["eval", str(out / "best.eqf"), str(tmp_path / "typed.xyz"), "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "by config_type" in printed and "md300K" in printed and "md800K" in printed
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    groups = report["by_config_type"]
    assert [groups[t]["n_configs"] for t in ("md300K", "md800K")] == [3, len(frames) - 3]
    # the groups' force MAEs, weighted by their atoms, make up the overall MAE
    pooled = sum(g["forces_mae"] * g["n_atoms"] for g in groups.values()) / report["metrics"]["n_atoms"]
    assert pooled == pytest.approx(report["metrics"]["forces_mae"], rel=1e-6)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, data_dir, capsys):
    path = write_config(tmp_path / "bad.yaml", data_dir, tmp_path / "out", lerning_rate=0.1)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "bad.yaml" in err and "training.lerning_rate" in err
    assert main(["eval", str(tmp_path / "missing.eqf"), str(data_dir / "test.xyz")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_python_dash_m_runs_the_cli():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "equiforce", "--version"], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.returncode == 0 and "equiforce" in done.stdout


def _graph(n_atoms: int, seed: int, **labels) -> dict:
    rng = np.random.default_rng(seed)
    config = Configuration(numbers=[29] * n_atoms, positions=rng.uniform(0, 3, (n_atoms, 3)), energy=-1.0 * n_atoms,
                           forces=rng.normal(size=(n_atoms, 3)), **labels)
    return config_to_graph(config, cutoff=3.0)


def test_loss_is_masked_and_weighted():
    a, b = _graph(3, 0), _graph(5, 1)
    b[K.HAS_FORCES][:] = 0.0
    batch = collate([a, b])
    pred = {K.ENERGY: batch[K.ENERGY] + torch.tensor([0.3, 1.0]), K.FORCES: batch[K.FORCES] + 0.1}
    pred[K.FORCES][3:] += 100.0  # unlabelled forces of graph b must not count
    loss_fn = WeightedLoss(energy_weight=1.0, forces_weight=10.0)
    total, parts = loss_fn(pred, batch)
    expected_energy = ((0.3 / 3) ** 2 + (1.0 / 5) ** 2) / 2
    assert float(parts["energy"]) == pytest.approx(expected_energy)
    assert float(parts["forces"]) == pytest.approx(0.01)
    assert float(total) == pytest.approx(expected_energy + 10 * 0.01)
    batch[K.WEIGHT][0] = 2.0
    assert float(loss_fn(pred, batch)[1]["forces"]) == pytest.approx(0.02)


def test_ema_averages_parameters_and_copies_buffers():
    model = make_model("L1-corr3")
    ema = EMA(model, decay=0.5)
    ema.num_updates = 100  # past the warm-up: the decay is 0.5
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.energy_shift.fill_(7.0)
    ema.update(model)
    for avg, old, new in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose(avg, 0.5 * old + 0.5 * new)
    assert float(ema.model.energy_shift) == 7.0


# ------------------------------------------------------------------ settings that used to go wrong silently


def test_a_forces_key_that_finds_nothing_is_an_error_listing_what_the_file_has(tmp_path, data_dir, capsys):
    """forces_key: REF_force for data holding REF_forces used to train an energy-only model without a word."""
    from ase.io import read

    frames = read(data_dir / "train.xyz", ":")
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
    write(tmp_path / "train.xyz", frames, format="extxyz")
    write(tmp_path / "test.xyz", frames[:2], format="extxyz")
    path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run", epochs=1)
    config = yaml.safe_load(path.read_text())
    config["data"].update(energy_key="REF_energy", forces_key="REF_force")
    path.write_text(yaml.safe_dump(config))
    from equiforce.errors import DataError
    from equiforce.models.file import save_model

    with pytest.raises(DataError) as err:
        train(load_config(path), progress=False)
    message = str(err.value)
    assert "field 'REF_force'" in message and "REF_forces" in message and "forces_weight: 0" in message
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    # eval with keys that find no label at all: an error, not an empty table reported as success
    save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    assert main(["eval", str(tmp_path / "m.eqf"), str(tmp_path / "test.xyz"), "--out", str(tmp_path / "e")]) == 2
    assert "no structure has a label under --energy-key 'energy'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m.eqf"), str(tmp_path / "test.xyz"), "--out", str(tmp_path / "e"),
                 "--energy-key", "REF_energy"]) == 0
    assert "no forces under --forces-key 'forces'" in capsys.readouterr().out


def test_eval_batch_size_must_be_positive(reference, data_dir, capsys):
    _, _, out = reference
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(out / "best.eqf"), str(data_dir / "test.xyz"), "--batch-size", bad])
        assert exit_.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_config_type_weights_naming_no_structure_are_an_error(tmp_path, data_dir):
    path = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", config_type_weights={"Bulk": 10.0})
    with pytest.raises(ConfigError, match=r"config_type_weights names config types .*\['Bulk'\].*\['Default'\]"):
        train(load_config(path), progress=False)


def test_a_broken_test_set_is_found_before_training(tmp_path, data_dir):
    from ase.io import read

    from equiforce.errors import DataError

    frames = read(data_dir / "test.xyz", ":")
    frames[1].positions[1] = frames[1].positions[0]  # two atoms on top of each other
    write(tmp_path / "test.xyz", frames, format="extxyz")
    write(tmp_path / "train.xyz", read(data_dir / "train.xyz", ":"), format="extxyz")
    epochs = []
    path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run")
    with pytest.raises(DataError, match=r"test\.xyz, frame 1"):
        train(load_config(path), progress=False, epoch_callback=epochs.append)
    assert epochs == []


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, data_dir):
    """A NaN loss is never "better": no best.eqf would ever be written and the run reported success."""
    from equiforce.errors import TrainingError

    path = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", lr=1e12, clip_grad=None, epochs=3)
    with pytest.raises(TrainingError, match=r"training diverged in epoch \d: the (training|validation) loss is"):
        train(load_config(path), progress=False)
    log = (tmp_path / "run" / "metrics.jsonl")
    assert not log.exists() or "NaN" not in log.read_text()

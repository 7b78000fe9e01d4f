"""Fine-tuning: a trained model continues on new data, replay of its old data limits forgetting (measured on
held-out old structures), elements new to the model are learned (old E0s kept, new ones fitted or given), and
the YAML path works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import molecule

from equiforce.data import collate, config_to_graph
from equiforce.data import keys as K
from equiforce.data.io import write_extxyz
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError
from equiforce.train.config import load_config
from equiforce.train.finetune import fine_tune
from equiforce.train.trainer import train, train_configs
from tests.conftest import make_model
from tests.uq_helpers import single_thread  # noqa: F401

SMALL = dict(channels=8, radial_mlp=[16], num_layers=2, max_l=1, sh_lmax=2, correlation=2, cutoff=4.0)
OLD = ("H2O", "CH4", "CH3OH")
NEW = ("HCOOH", "C2H4", "CH3CHO")


def teacher_label(atoms, teacher, source: str, frame: int) -> Configuration:
    pred = teacher(collate([config_to_graph(Configuration.from_atoms(atoms), teacher.cutoff)]), compute_forces=True)
    return Configuration.from_atoms(atoms, energy=float(pred[K.ENERGY].detach().sum()),
                                    forces=pred[K.FORCES].detach().numpy(), source=source, frame=frame)


def labelled(names, n: int, seed: int, teacher) -> list[Configuration]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule(names[i % len(names)])
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        out.append(teacher_label(atoms, teacher, "teacher", i))
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    teacher = make_model("small", seed=7)
    root = tmp_path_factory.mktemp("pretrain")
    old = labelled(OLD, 30, 0, teacher)
    result = train_configs(old, None, {**SMALL, "elements": [1, 6, 8]},
                           dict(epochs=30, batch_size=4, lr=0.01, device="cpu", seed=0), root / "run",
                           valid_fraction=0.2, progress=False)
    return teacher, old, result["best_model"], root


def test_replay_limits_forgetting_while_the_new_data_are_learned(pretrained, tmp_path):
    teacher, old, start, _ = pretrained
    new = labelled(NEW, 24, 1, teacher)
    new_test = labelled(NEW, 9, 2, teacher)
    training = dict(epochs=25, batch_size=4, lr=0.005, device="cpu", seed=0)
    plain = fine_tune(start, new, None, training, tmp_path / "plain", replay=old, replay_frames=0, test=new_test,
                      progress=False)
    replayed = fine_tune(start, new, None, training, tmp_path / "replay", replay=old, replay_frames=30,
                         replay_weight=1.0, replay_holdout=0.3, test=new_test, progress=False)
    forgetting = replayed["forgetting"]
    assert replayed["n_replay"] == 21 and forgetting["before"]["n_configs"] == 9
    kept = json.loads((tmp_path / "replay" / "finetune.json").read_text())  # beside the model, for the CLI user
    assert kept["forgetting"]["after"]["forces_mae"] == pytest.approx(forgetting["after"]["forces_mae"])
    # the plain run, rated on the same held-out old structures
    from equiforce.evaluate import evaluate
    from equiforce.models.file import load_model
    from equiforce.train.finetune import _replay_sets

    _, held_out = _replay_sets(old, 30, 0.3, 0)
    plain_after = evaluate(load_model(plain["best_model"]), held_out)
    # measured: old-data force MAE 33.1 meV/Å before; 32.8 after fine-tuning with replay, 46.2 without
    assert forgetting["after"]["forces_mae"] < plain_after["forces_mae"]
    assert forgetting["after"]["forces_mae"] < 1.15 * forgetting["before"]["forces_mae"]
    # both learned the new chemistry: better on it than the pretrained model
    before_new = evaluate(load_model(start), new_test)["forces_mae"]
    assert plain["test"]["forces_mae"] < before_new and replayed["test"]["forces_mae"] < before_new


def with_copper(names, n: int, seed: int, teacher) -> list[Configuration]:
    """Molecules of ``names`` with a Cu atom 1.9-2.3 Å from their first atom, labelled by the teacher."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule(names[i % len(names)])
        while True:
            direction = rng.normal(size=3)
            spot = atoms.positions[0] + rng.uniform(1.9, 2.3) * direction / np.linalg.norm(direction)
            if np.linalg.norm(atoms.positions - spot, axis=1).min() > 1.6:
                break
        atoms += Atoms("Cu", positions=[spot])
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(teacher_label(atoms, teacher, "teacher-cu", i))
    return out


def test_fine_tuning_teaches_an_element_the_model_never_saw(pretrained, tmp_path):
    teacher, old, start, _ = pretrained
    new, new_test = with_copper(NEW, 24, 5, teacher), with_copper(NEW, 9, 6, teacher)
    training = dict(epochs=25, batch_size=4, lr=0.005, device="cpu", seed=0)
    result = fine_tune(start, new, None, training, tmp_path / "cu", replay=old, replay_frames=20, test=new_test,
                       progress=False)
    assert result["added_elements"] == [29]
    from equiforce.evaluate import evaluate
    from equiforce.models.extend import with_elements
    from equiforce.models.file import load_model

    before, best = load_model(start), load_model(result["best_model"])
    assert best.spec.elements == [1, 6, 8, 29]
    assert {z: best.spec.e0s[z] for z in (1, 6, 8)} == before.spec.e0s  # the old E0s are kept exactly
    untrained = with_elements(before, [29], {29: best.spec.e0s[29]})
    start_error = evaluate(untrained, new_test)
    # measured: force MAE 124 -> 78 meV/Å, energy MAE 804 -> 86 meV (the new element's weights start at random)
    assert result["test"]["forces_mae"] < 0.75 * start_error["forces_mae"]
    assert result["test"]["energy_mae"] < 0.2 * start_error["energy_mae"]
    # what it knew is mostly kept (replay): measured 49.6 -> 61.9 meV/Å on the held-out old structures
    forgetting = result["forgetting"]
    assert forgetting["after"]["forces_mae"] < 1.4 * forgetting["before"]["forces_mae"]


def test_energies_of_another_reference_are_warned_of(pretrained, tmp_path, recwarn):
    """Labels 5 eV/atom away from the start model's (another code or functional) are said before fine-tuning;
    the model's own level of theory is not."""
    import dataclasses

    teacher, _, start, _ = pretrained
    new = labelled(NEW, 8, 3, teacher)
    one_epoch = dict(epochs=1, batch_size=4, device="cpu")
    fine_tune(start, new, None, one_epoch, tmp_path / "same", progress=False)
    assert not [w for w in recwarn if "another level of theory" in str(w.message)]
    shifted = [dataclasses.replace(c, energy=c.energy + 5.0 * c.n_atoms) for c in new]
    with pytest.warns(UserWarning, match=r"differ from the start model's by [45]\.\d+ eV/atom.*another level of"):
        fine_tune(start, shifted, None, one_epoch, tmp_path / "shifted", progress=False)


def test_new_element_e0s_and_refusals(pretrained, tmp_path):
    teacher, old, start, _ = pretrained
    new = with_copper(NEW, 6, 7, teacher)
    one_epoch = dict(epochs=1, batch_size=4, device="cpu")
    result = fine_tune(start, new, None, one_epoch, tmp_path / "given", e0s={29: -4.5, 1: 99.0}, progress=False)
    from equiforce.models.file import load_model

    spec = load_model(result["best_model"]).spec
    assert spec.e0s[29] == -4.5 and spec.e0s[1] == load_model(start).spec.e0s[1]  # only new elements take it
    with pytest.raises(ConfigError, match=r"E0s for Cu: no isolated-atom frame"):
        fine_tune(start, new, None, one_epoch, tmp_path / "isolated", e0s="isolated", progress=False)
    molecules = labelled(NEW, 6, 8, teacher)
    with pytest.raises(ConfigError, match=r"validation data hold elements \[29\] that neither the model"):
        fine_tune(start, molecules, new, one_epoch, tmp_path / "valid", progress=False)


def perturbed_copy(path, scale: float, seed: int):
    """The model in ``path`` with its weights nudged: a second ensemble member without a second training."""
    import torch

    from equiforce.models.file import load_model

    model = load_model(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


@pytest.mark.parametrize("kind", ["ensemble", "heads"])
def test_a_model_with_uncertainty_is_fine_tuned_and_recalibrated(pretrained, tmp_path, kind, capsys):
    teacher, old, start, _ = pretrained
    from equiforce.data.graph import config_to_graph as graph_of
    from equiforce.models.file import load_model
    from equiforce.uq.ensemble import EnsemblePotential
    from equiforce.uq.file import save_uq_model
    from equiforce.uq.fit import build_uq_potential
    from equiforce.uq.heads import UQPotential
    from equiforce.uq.predict import predict

    if kind == "ensemble":
        model = EnsemblePotential.from_members([load_model(start), perturbed_copy(start, 0.05, 1)])
    else:
        graphs = [graph_of(c, 4.0) for c in old]
        model = build_uq_potential(load_model(start), graphs[:20], graphs[20:], n_heads=4, hidden=8, steps=50)
    save_uq_model(model, tmp_path / "start.eqf")
    new, new_test = with_copper(NEW, 40, 9, teacher), with_copper(NEW, 6, 10, teacher)
    training = dict(epochs=3, batch_size=4, lr=0.005, device="cpu", seed=0)
    result = fine_tune(tmp_path / "start.eqf", new, None, training, tmp_path / "tuned", valid_fraction=0.25,
                       replay=old, replay_frames=10, test=new_test, progress=False)
    assert result["added_elements"] == [29] and result["uq_method"] == kind
    assert len(result["parts"]) == (2 if kind == "ensemble" else 1) and "forgetting" in result
    tuned = load_model(result["best_model"])
    assert isinstance(tuned, EnsemblePotential if kind == "ensemble" else UQPotential)
    assert tuned.spec.elements == [1, 6, 8, 29] and 29 in tuned.seen_elements
    assert tuned.calibration.fitted("forces") and result["test"]["n_configs"] == 6
    out = predict(tuned, [graph_of(c, 4.0) for c in new_test])
    sigma = out.forces_sigma
    assert np.isfinite(sigma).all() and (sigma > 0).all()
    # the members (or the backbone) resume from their checkpoints: a second call trains nothing again
    again = fine_tune(tmp_path / "start.eqf", new, None, training, tmp_path / "tuned", valid_fraction=0.25,
                      replay=old, replay_frames=10, progress=False)
    assert all(part["resumed_from"] is not None for part in again["parts"])
    if kind == "ensemble":  # and through the YAML and the command line
        from equiforce.cli import main

        write_extxyz(new, tmp_path / "new.xyz")
        config = {"data": {"train": str(tmp_path / "new.xyz"), "valid_fraction": 0.25},
                  "training": training, "finetune": {"start": str(tmp_path / "start.eqf")},
                  "output": {"directory": str(tmp_path / "tuned_cli")}}  # no replay: other data, a run of its own
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "fine-tuned ensemble model, recalibrated" in printed and "finetune.json" in "".join(printed.split())
        assert (tmp_path / "tuned_cli" / "finetune.json").is_file()
    # too few validation structures to recalibrate: said before any training
    from equiforce.uq.calibration import CalibrationError

    with pytest.raises(CalibrationError, match="needs at least 10, got 4"):
        fine_tune(tmp_path / "start.eqf", new[:16], None, training, tmp_path / "few", valid_fraction=0.25,
                  progress=False)


def test_yaml_finetune_section(pretrained, tmp_path):
    teacher, old, start, _ = pretrained
    write_extxyz(labelled(NEW, 8, 3, teacher), tmp_path / "new.xyz")
    write_extxyz(old, tmp_path / "old.xyz")
    config = {"data": {"train": str(tmp_path / "new.xyz"), "valid_fraction": 0.25},
              "training": {"epochs": 2, "batch_size": 4, "device": "cpu"},
              "finetune": {"start": str(start), "replay": str(tmp_path / "old.xyz"), "replay_frames": 10},
              "output": {"directory": str(tmp_path / "out")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = train(load_config(tmp_path / "c.yaml"), progress=False)
    assert result["n_replay"] == 8 and "forgetting" in result
    from equiforce.models.file import read_header

    assert read_header(tmp_path / "out" / "best.eqf")["extra"]["finetune"]["start"] == str(start)
    config["finetune"]["start"] = str(tmp_path / "missing.eqf")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(config))
    from equiforce.errors import ModelFileError

    with pytest.raises(ModelFileError, match="finetune.start: model file .*missing.eqf does not exist"):
        train(load_config(tmp_path / "missing.yaml"), progress=False)
    config["finetune"]["strat"] = "typo"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="strat"):
        load_config(tmp_path / "bad.yaml")


def test_fine_tuning_from_packs_equals_fine_tuning_from_files(pretrained, tmp_path):
    """data.train may be a pack (read into memory: fine-tuning sets are small) and finetune.replay a pack of the
    pretraining set (only the sampled replay structures are read): the model the files give."""
    import torch
    from safetensors.torch import load_file

    from equiforce.data.packed import pack

    teacher, old, start, _ = pretrained
    write_extxyz(labelled(NEW, 8, 3, teacher), tmp_path / "new.xyz")
    write_extxyz(old, tmp_path / "old.xyz")
    for name in ("new", "old"):
        pack([tmp_path / f"{name}.xyz"], tmp_path / f"{name}.pack", cutoff=6.0)
    for kind in ("xyz", "pack"):
        config = {"data": {"train": str(tmp_path / f"new.{kind}"), "valid_fraction": 0.25},
                  "training": {"epochs": 2, "batch_size": 4, "device": "cpu"},
                  "finetune": {"start": str(start), "replay": str(tmp_path / f"old.{kind}"), "replay_frames": 10},
                  "output": {"directory": str(tmp_path / kind)}}
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(config))
        result = train(load_config(tmp_path / f"{kind}.yaml"), progress=False)
        assert result["n_replay"] == 8
    weights, expected = load_file(tmp_path / "pack" / "last.eqf"), load_file(tmp_path / "xyz" / "last.eqf")
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-8, atol=1e-10)
    reports = [json.loads((tmp_path / kind / "finetune.json").read_text()) for kind in ("pack", "xyz")]
    assert reports[0]["forgetting"]["before"]["forces_mae"] == pytest.approx(
        reports[1]["forgetting"]["before"]["forces_mae"], rel=1e-9)


def test_fine_tuning_a_pack_reads_its_other_files_with_the_pack_keys(pretrained, tmp_path):
    """Fine-tuning reads a pack made with other label keys; its validation file is read with those keys (as
    training from a pack does), and a pack without forces says to pack again, not to set data.forces_key."""
    from ase.io import write

    from equiforce.data.packed import pack
    from equiforce.errors import DataError

    teacher, _, start, _ = pretrained
    frames = []
    for config in labelled(NEW, 12, 5, teacher):
        atoms = config.to_atoms()
        atoms.info["REF_energy"] = config.energy
        atoms.arrays["REF_forces"] = config.forces
        frames.append(atoms)
    write(tmp_path / "ref.xyz", frames[:8], format="extxyz")
    write(tmp_path / "ref_valid.xyz", frames[8:], format="extxyz")
    pack([tmp_path / "ref.xyz"], tmp_path / "ref.pack", cutoff=6.0,
         reader={"energy_key": "REF_energy", "forces_key": "REF_forces"})
    pack([tmp_path / "ref.xyz"], tmp_path / "energies.pack", cutoff=6.0, reader={"energy_key": "REF_energy"})
    config = {"data": {"train": str(tmp_path / "ref.pack"), "valid": str(tmp_path / "ref_valid.xyz")},
              "training": {"epochs": 1, "batch_size": 4, "device": "cpu"},
              "finetune": {"start": str(start)}, "output": {"directory": str(tmp_path / "out")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = train(load_config(tmp_path / "c.yaml"), progress=False)
    assert (result["n_train"], result["n_valid"]) == (8, 4)
    config["data"]["train"] = str(tmp_path / "energies.pack")
    config["output"]["directory"] = str(tmp_path / "out2")
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError, match="packed without them.*--forces-key"):
        train(load_config(tmp_path / "c2.yaml"), progress=False)


@pytest.mark.slow
def test_finetune_benchmark_smoke(tmp_path):
    """benchmarks/finetune.py at toy sizes on the rMD17 files (about a minute; skipped without ../shared)."""
    import json
    import subprocess
    import sys

    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "rmd17" / "rmd17_aspirin_train_01.npz").is_file():
        pytest.skip("rMD17 data not found beside the repository")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"
    out = tmp_path / "f.json"
    subprocess.run([sys.executable, str(script), "--rmd17", str(SHARED_DATA / "rmd17"), "--pretrain-frames", "4",
                    "--pretrain-min", "0.1", "--finetune-frames", "10", "--finetune-min", "0.05", "--test-frames",
                    "5", "--replay-frames", "10", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                   check=True, capture_output=True, timeout=900)
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"scratch", "pretrained", "finetune", "finetune_replay"}
    assert report["pretrain_frames"] == 36 and report["n_others_test"] == 180
    assert all(arm["f_mae_mev_a"] > 0 and arm["others_f_mae_mev_a"] > 0 for arm in report["arms"].values())
    # a target with an element the pretraining never had: fine-tuning adds it, zero-shot has no target numbers
    subprocess.run([sys.executable, str(script), "--rmd17", str(SHARED_DATA / "rmd17"), "--target", "uracil",
                    "--new-element", "N", "--pretrain-frames", "4", "--pretrain-min", "0.1", "--finetune-frames", "10",
                    "--finetune-min", "0.05", "--test-frames", "5", "--replay-frames", "10", "--workdir",
                    str(tmp_path / "n"), "--out", str(out)], check=True, capture_output=True, timeout=900)
    report = json.loads(out.read_text())
    assert report["pretrain_molecules"] == ["aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene",
                                            "salicylic", "toluene"]
    assert report["model"]["elements"] == [1, 6, 8] and report["arms"]["pretrained"]["f_mae_mev_a"] is None
    assert report["arms"]["finetune_replay"]["elements"] == [1, 6, 7, 8]
    assert report["arms"]["finetune"]["f_mae_mev_a"] > 0

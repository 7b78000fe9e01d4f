"""UQ model files: bit-identical round trips with calibration; mismatched or tampered files refused."""

from __future__ import annotations

import json

import pytest
import torch
from ase.build import bulk, molecule
from safetensors import safe_open
from safetensors.torch import save_file

import equiforce
from equiforce.data import keys as K
from equiforce.errors import ModelFileError
from equiforce.uq import keys as UK
from equiforce.uq.calibration import Calibration, QuantityCalibration
from equiforce.uq.ensemble import EnsemblePotential, MemberMismatchError
from equiforce.uq.file import save_uq_model
from equiforce.uq.fit import build_uq_potential
from tests.conftest import make_model
from tests.uq_helpers import batch_of, ensemble, graphs, labelled, single_thread  # noqa: F401

CALIBRATION = Calibration({"energy": QuantityCalibration("scale", 1.37, n_structures=12, n_samples=12),
                           "forces": QuantityCalibration("isotonic", 1.0, [0.01, 0.2, 0.9], [0.02, 0.3, 1.1], 12, 90)})


def _batch():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=2)
    return batch_of([molecule("CH3CH2OH"), cu])


def _assert_identical(a, b):
    out_a, out_b = a(_batch(), compute_stress=True), b(_batch(), compute_stress=True)
    assert set(out_a) == set(out_b)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key


def test_ensemble_round_trip_is_bit_identical(tmp_path):
    model = ensemble(3)
    model.calibration = CALIBRATION
    model.set_seen_elements([1, 6, 8, 29])
    path = save_uq_model(model, tmp_path / "ens.eqf")
    loaded = equiforce.load_model(path)
    assert isinstance(loaded, EnsemblePotential) and loaded.n_members == 3
    assert loaded.calibration == CALIBRATION and loaded.seen_elements == [1, 6, 8, 29]
    assert loaded.header["model_class"] == "EnsemblePotential"
    _assert_identical(model, loaded)
    assert equiforce.load_model(path, dtype=torch.float32).dtype == torch.float32


def test_heads_round_trip_is_bit_identical(tmp_path):
    model = build_uq_potential(make_model("L1-corr3"), graphs(labelled(12, seed=1, periodic=True)),
                               graphs(labelled(12, seed=2, periodic=True)), steps=5, n_heads=3, hidden=4)
    path = save_uq_model(model, tmp_path / "heads.eqf")
    loaded = equiforce.load_model(path)
    assert type(loaded).__name__ == "UQPotential" and loaded.calibration == model.calibration
    assert loaded.heads.stress_trained == model.heads.stress_trained
    _assert_identical(model, loaded)
    assert UK.STRESS_STD in loaded(_batch(), compute_stress=True)


def _rewrite(path, out, header_edit=None, tensor_edit=None):
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata["equiforce"])
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(out), metadata={"equiforce": json.dumps(header)})
    return out


def test_file_with_mismatched_members_is_refused(tmp_path):
    path = save_uq_model(ensemble(2), tmp_path / "ens.eqf")

    def other_spec(header):
        header["uq"]["members"][1]["spec"]["channels"] = 16

    with pytest.raises(MemberMismatchError, match="member 1 differs .* channels"):
        equiforce.load_model(_rewrite(path, tmp_path / "spec.eqf", header_edit=other_spec))

    def drop_member(tensors):
        name = next(iter(tensors))
        tensors[name] = tensors[name][:1].clone()

    with pytest.raises(MemberMismatchError, match="holds"):
        equiforce.load_model(_rewrite(path, tmp_path / "shape.eqf", tensor_edit=drop_member))

    def wrong_count(header):
        header["uq"]["n_members"] = 3

    with pytest.raises(MemberMismatchError, match="n_members=3"):
        equiforce.load_model(_rewrite(path, tmp_path / "count.eqf", header_edit=wrong_count))

    def bad_calibration(header):
        header["uq"]["calibration"] = {"energy": {"method": "voodoo"}}

    with pytest.raises(ModelFileError, match="calibration"):
        equiforce.load_model(_rewrite(path, tmp_path / "cal.eqf", header_edit=bad_calibration))


def test_plain_model_files_still_load_as_potentials(tmp_path):
    path = equiforce.save_model(make_model("L1-corr3"), tmp_path / "plain.eqf")
    model = equiforce.load_model(path)
    assert isinstance(model, equiforce.Potential)
    assert UK.ENERGY_STD not in model(_batch()) and K.FORCES in model(_batch())

"""Model files: bit-identical round trip, and nothing that is not a safetensors model gets loaded."""

from __future__ import annotations

import json
import pickle  # noqa: S403  (used only to craft a malicious payload that must be refused)
import zipfile

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import equiforce
from equiforce.data import atoms_to_graph, collate
from equiforce.errors import ModelFileError
from equiforce.models.file import read_header
from tests.conftest import make_model


def outputs(model, atoms, stress=False):
    out = model(collate([atoms_to_graph(atoms, model.cutoff)]), compute_forces=True, compute_stress=stress)
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("name", ["L1-corr3", "L2-corr2-zbl", "L1-corr3-branches"])
def test_round_trip_is_bit_identical(tmp_path, name):
    model = make_model(name)
    path = equiforce.save_model(model, tmp_path / "model.eqf", extra={"note": "test"})
    loaded = equiforce.load_model(path)
    for atoms, stress in [(molecule("CH3CH2OH"), False), (bulk("Cu", "fcc", a=3.6) * (2, 1, 1), True)]:
        atoms.rattle(0.05, seed=1)
        a, b = outputs(model, atoms, stress), outputs(loaded, atoms, stress)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    header = read_header(path)
    assert header["spec"]["elements"] == model.spec.elements
    assert header["equiforce_version"] == equiforce.__version__
    assert header["units"]["energy"] == "eV"
    assert header["extra"]["note"] == "test"
    assert {int(k) for k in header["spec"]["e0s"]} == set(model.spec.e0s)


def test_load_casts_dtype(tmp_path):
    model = make_model("L1-corr3")
    path = equiforce.save_model(model, tmp_path / "m.eqf")
    loaded = equiforce.load_model(path, dtype=torch.float32)
    assert next(loaded.parameters()).dtype == torch.float32


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "evil.eqf"
    raw.write_bytes(pickle.dumps({"state": _Exploit()}))
    with pytest.raises(ModelFileError, match="not an equiforce model file"):
        equiforce.load_model(raw)
    # the torch.save zip container with a pickle inside is refused too
    zipped = tmp_path / "evil_zip.eqf"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_Exploit()))
    with pytest.raises(ModelFileError):
        equiforce.load_model(zipped)
    assert not (tmp_path / "PWNED").exists()


def test_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        equiforce.load_model(tmp_path / "missing.eqf")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelFileError, match="no equiforce model header"):
        equiforce.load_model(plain)
    model = make_model("L1-corr3")
    bad_spec = tmp_path / "bad_spec.eqf"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    header = json.dumps({"format": "equiforce-model", "format_version": 1, "spec": {"elements": [29], "bogus": 1}})
    save_file(tensors, str(bad_spec), metadata={"equiforce": header})
    with pytest.raises(ModelFileError, match="invalid model spec"):
        equiforce.load_model(bad_spec)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = make_model("L1-corr3")
    path = equiforce.save_model(model, tmp_path / "m.eqf")
    before = path.read_bytes()
    import equiforce.models.file as model_file

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_file, "save_file", broken)
    with pytest.raises(OSError):
        equiforce.save_model(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.eqf"]
    np.testing.assert_equal(len(before) > 0, True)


def test_new_models_bound_their_basis_while_older_files_load_as_built():
    """The training configuration switches basis_bound on; ModelSpec's own default (what a file without
    the key means) stays off, so a model file written before the option existed is rebuilt unchanged."""
    from equiforce.models import ModelSpec
    from equiforce.train.config import ModelConfig

    assert ModelConfig().basis_bound == 4.0
    assert ModelConfig(basis_bound=None).basis_bound is None
    assert ModelSpec(elements=[1]).basis_bound is None
    assert ModelSpec.model_validate({"elements": [1, 8], "channels": 4}).basis_bound is None


def test_new_models_gate_their_shift_by_bonds_while_older_files_keep_coordination():
    """New models get the bond gate with the wide switch; a file without the keys (written before) is rebuilt
    with the coordination gate and the switch it had, and an explicit choice in the config is kept."""
    from equiforce.models import ModelSpec
    from equiforce.models.spec import DEFAULT_BOND_SWITCH, WIDE_BOND_SWITCH
    from equiforce.train.config import ModelConfig

    assert ModelConfig().shift_gate == "bonds" and tuple(ModelConfig().bond_switch) == WIDE_BOND_SWITCH
    assert ModelConfig(shift_gate="coordination").shift_gate == "coordination"
    assert tuple(ModelConfig(bond_switch=[1.3, 1.8]).bond_switch) == (1.3, 1.8)
    old = ModelSpec.model_validate({"elements": [1, 8], "channels": 4})
    assert old.shift_gate == "coordination" and tuple(old.bond_switch) == DEFAULT_BOND_SWITCH


def test_new_models_keep_their_zbl_prior_below_the_data_while_older_files_keep_the_covalent_range():
    """New models get ``zbl_range: fade`` (the prior only where the fade hands a pair to it); a file without
    the key (written before) is rebuilt with the covalent range it had, and an explicit choice is kept."""
    from equiforce.models import ModelSpec
    from equiforce.train.config import ModelConfig

    assert ModelConfig().zbl_range == "fade"
    assert ModelConfig(zbl_range="covalent").zbl_range == "covalent"
    assert ModelSpec.model_validate({"elements": [1, 8], "channels": 4, "zbl": True}).zbl_range == "covalent"


@pytest.mark.parametrize("change, message", [
    ({"dtype": "load"}, "unknown weight dtype 'load'"),
    ({"dtype": "int64"}, "unknown weight dtype 'int64'"),
    ({"format_version": "one"}, "format version 'one' is not an integer"),
    (None, "not a JSON object"),
])
def test_damaged_headers_are_model_file_errors(tmp_path, change, message):
    """A hand-edited or damaged header is refused by name, never a traceback, and no torch attribute is looked
    up by a name from the file."""
    from safetensors.torch import save_file

    good = equiforce.save_model(make_model("L1-corr3"), tmp_path / "good.eqf")
    header = read_header(good)
    header = [header] if change is None else {**header, **change}
    tensors = {k: v.contiguous() for k, v in make_model("L1-corr3").state_dict().items()}
    path = tmp_path / "damaged.eqf"
    save_file(tensors, str(path), metadata={"equiforce": json.dumps(header)})
    with pytest.raises(ModelFileError, match=message):
        equiforce.load_model(path)


def test_a_spec_larger_than_its_weights_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A hostile or damaged header asking for a huge model gets no memory: shapes are checked on the meta device."""
    from safetensors.torch import save_file

    import equiforce.models.file as model_file

    good = equiforce.save_model(make_model("L1-corr3"), tmp_path / "good.eqf")
    header = read_header(good)
    header["spec"] = {**header["spec"], "channels": 100_000}
    tensors = {k: v.contiguous() for k, v in make_model("L1-corr3").state_dict().items()}
    path = tmp_path / "huge.eqf"
    save_file(tensors, str(path), metadata={"equiforce": json.dumps(header)})
    real_build, devices = model_file.build_model, []

    def recording_build(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the ambient device: meta inside the check
        return real_build(*args, **kwargs)

    monkeypatch.setattr(model_file, "build_model", recording_build)
    with pytest.raises(ModelFileError, match=r"weights do not match the spec \(.*the spec needs"):
        equiforce.load_model(path)
    assert devices == ["meta"]  # only the shape check ran: no real (huge) model was ever allocated

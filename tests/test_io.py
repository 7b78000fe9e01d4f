"""Readers: every supported layout gives the same Configuration, in eV/Å, and bad input names file/frame/field."""

from __future__ import annotations

from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from equiforce.data.graph import config_to_graph
from equiforce.data.io import KCAL_PER_MOL, read_configurations, write_extxyz
from equiforce.data.structure import Configuration
from equiforce.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def emt_frames(n: int = 3, seed: int = 0) -> list[Atoms]:
    """Rattled periodic Cu/Ni cells labelled by EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[k % 4] = 28
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.cell = atoms.cell * (1 + 0.02 * k)
        atoms.positions *= 1 + 0.02 * k
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    return frames


def assert_matches(config: Configuration, atoms: Atoms, stress: bool = True) -> None:
    np.testing.assert_array_equal(config.numbers, atoms.numbers)
    np.testing.assert_allclose(config.positions, atoms.positions, atol=1e-7)
    np.testing.assert_allclose(config.cell, np.asarray(atoms.cell), atol=1e-7)
    np.testing.assert_array_equal(config.pbc, atoms.pbc)
    assert config.energy == pytest.approx(atoms.calc.results["energy"], abs=1e-7)
    np.testing.assert_allclose(config.forces, atoms.calc.results["forces"], atol=1e-7)
    if stress:
        full = Atoms(cell=np.eye(3))
        full.calc = SinglePointCalculator(full, stress=atoms.calc.results["stress"])
        np.testing.assert_allclose(config.stress, full.get_stress(voigt=False), atol=1e-9)


def assert_data_error(err: pytest.ExceptionInfo, path: Path, field: str | None, frame: int | None = None) -> None:
    message = str(err.value)
    assert path.name in message
    if frame is not None:
        assert f"frame {frame}" in message
    if field is not None:
        assert f"'{field}'" in message and err.value.field == field


# ---------------------------------------------------------------------------------------------- extxyz


def test_extxyz_round_trip_calculator_results(tmp_path):
    frames = emt_frames()
    path = tmp_path / "cu.xyz"
    ase.io.write(path, frames, format="extxyz")
    configs = read_configurations(path, require_forces=True)
    assert len(configs) == len(frames)
    for k, (config, atoms) in enumerate(zip(configs, frames)):
        assert_matches(config, atoms)
        assert config.source == str(path) and config.frame == k
        assert config.config_type == "Default" and config.weight == 1.0
        assert config.stress.shape == (3, 3)
    # and through our writer, with config_type and weight preserved
    configs[1].config_type, configs[1].weight = "bulk", 2.5
    path2 = tmp_path / "again.xyz"
    write_extxyz(configs, path2)
    again = read_configurations(path2)
    for a, b in zip(configs, again):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
        np.testing.assert_allclose(a.stress, b.stress, atol=1e-9)
        assert a.energy == pytest.approx(b.energy, abs=1e-8)
        assert (a.config_type, a.weight) == (b.config_type, b.weight)


def test_index_selects_frames_and_keeps_frame_numbers(tmp_path):
    path = tmp_path / "cu.xyz"
    ase.io.write(path, emt_frames(4), format="extxyz")
    assert [c.frame for c in read_configurations(path, index="1:4:2")] == [1, 3]
    assert [c.frame for c in read_configurations(path, index=2)] == [2]
    assert [c.frame for c in read_configurations(path, index="-2:")] == [2, 3]
    assert [c.frame for c in read_configurations(path, index=-1)] == [3]
    backwards = read_configurations(path, index="::-1")
    assert [c.frame for c in backwards] == [3, 2, 1, 0]
    assert backwards[0].energy == read_configurations(path)[3].energy


def test_custom_keys_in_info_and_arrays(tmp_path):
    frames = emt_frames(2)
    for atoms in frames:
        results = atoms.calc.results
        atoms.calc = None
        atoms.info["dft_energy"] = results["energy"] + 1.0
        atoms.arrays["dft_forces"] = results["forces"] * 2
        atoms.info["dft_stress"] = results["stress"]  # Voigt 6 in info
        atoms.info["kind"] = "rattled"
        atoms.info["w"] = 3.0
    path = tmp_path / "custom.xyz"
    ase.io.write(path, frames, format="extxyz")
    configs = read_configurations(path, energy_key="dft_energy", forces_key="dft_forces", stress_key="dft_stress",
                                  config_type_key="kind", weight_key="w")
    for config, atoms in zip(configs, frames):
        assert config.energy == pytest.approx(atoms.info["dft_energy"])
        np.testing.assert_allclose(config.forces, atoms.arrays["dft_forces"], atol=1e-7)
        assert config.stress[0, 1] == pytest.approx(atoms.info["dft_stress"][5])
        assert config.config_type == "rattled" and config.weight == 3.0
    # the default keys are absent from this file
    with pytest.raises(DataError) as err:
        read_configurations(path)
    assert_data_error(err, path, "energy", frame=0)


def test_info_key_wins_over_calculator(tmp_path):
    atoms = emt_frames(1)[0]
    atoms.info["dft_energy"] = -1.25
    path = tmp_path / "both.xyz"
    ase.io.write(path, atoms, format="extxyz")
    assert read_configurations(path, energy_key="dft_energy")[0].energy == -1.25
    assert read_configurations(path)[0].energy == pytest.approx(atoms.calc.results["energy"])


def test_virial_converts_to_stress(tmp_path):
    atoms = emt_frames(1)[0]
    stress = atoms.calc.results["stress"]
    atoms.calc = None
    atoms.info["energy_dft"] = 0.0
    full = np.array([[stress[0], stress[5], stress[4]], [stress[5], stress[1], stress[3]],
                     [stress[4], stress[3], stress[2]]])
    atoms.info["virial"] = -full * atoms.get_volume()  # extxyz writes a 3x3 virial as 9 numbers
    path = tmp_path / "virial.xyz"
    ase.io.write(path, atoms, format="extxyz")
    config = read_configurations(path, energy_key="energy_dft")[0]
    np.testing.assert_allclose(config.stress, full, atol=1e-10)
    # 6-component Voigt virial from an in-memory Atoms (db/info path)
    db_path = tmp_path / "virial.db"
    with ase.db.connect(db_path) as db:
        db.write(Atoms(atoms), energy_dft=0.0, data={"virial": -stress * atoms.get_volume()})
    config = read_configurations(db_path, energy_key="energy_dft")[0]
    np.testing.assert_allclose(config.stress, full, atol=1e-10)


def test_non_periodic_molecule_without_stress(tmp_path):
    mol = molecule("CH4")
    mol.info["energy"] = -1.0  # in info (ase moves it to the calculator) with a per-atom custom array
    mol.arrays["F"] = np.ones((5, 3))
    path = tmp_path / "mol.xyz"
    ase.io.write(path, mol, format="extxyz")
    config = read_configurations(path, forces_key="F")[0]
    assert config.energy == -1.0 and config.stress is None and not config.pbc.any()
    np.testing.assert_array_equal(config.forces, np.ones((5, 3)))


# ---------------------------------------------------------------------------------------------- ase db


def test_ase_db_reader(tmp_path):
    frames = emt_frames(3)
    path = tmp_path / "cu.db"
    with ase.db.connect(path) as db:
        for k, atoms in enumerate(frames):
            db.write(atoms, config_type=f"t{k}", config_weight=0.5)
    configs = read_configurations(path, require_forces=True)
    assert len(configs) == 3
    for k, (config, atoms) in enumerate(zip(configs, frames)):
        assert_matches(config, atoms)
        assert config.frame == k and config.config_type == f"t{k}" and config.weight == 0.5
    assert [c.frame for c in read_configurations(path, index="1:")] == [1, 2]


def test_ase_db_custom_keys_from_key_value_pairs(tmp_path):
    atoms = bulk("Ni", "fcc", a=3.5, cubic=True)
    path = tmp_path / "ni.db"
    with ase.db.connect(path) as db:
        db.write(atoms, dft_energy=-7.5, data={"dft_forces": np.full((4, 3), 0.1)})
    config = read_configurations(path, energy_key="dft_energy", forces_key="dft_forces")[0]
    assert config.energy == -7.5
    np.testing.assert_allclose(config.forces, 0.1)


def test_ase_db_labels_become_writable_arrays(tmp_path, recwarn):
    """A database hands out read-only arrays; torch warned on every graph built from them."""
    atoms = bulk("Ni", "fcc", a=3.5, cubic=True)
    path = tmp_path / "ni.db"
    with ase.db.connect(path) as db:
        db.write(atoms, dft_energy=-7.5, data={"dft_forces": np.full((4, 3), 0.1)})
    config = read_configurations(path, energy_key="dft_energy", forces_key="dft_forces")[0]
    assert config.forces.flags.writeable
    config_to_graph(config, 4.0)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


# ---------------------------------------------------------------------------------------------- npz


def write_rmd17(path: Path, n_frames: int = 3, **overrides) -> dict:
    rng = np.random.default_rng(1)
    data = {
        "nuclear_charges": np.array([6, 1, 1, 8], dtype=np.uint8),
        "coords": rng.uniform(0, 3, (n_frames, 4, 3)),
        "energies": rng.uniform(-1000, -900, n_frames),
        "forces": rng.normal(0, 10, (n_frames, 4, 3)),
        "old_indices": np.arange(n_frames),
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    np.savez(path, **data)
    return data


def test_rmd17_npz_units(tmp_path):
    path = tmp_path / "mol.npz"
    data = write_rmd17(path)
    assert KCAL_PER_MOL == pytest.approx(0.0433641, rel=1e-5)  # 1 kcal/mol in eV
    configs = read_configurations(path, require_forces=True)
    assert len(configs) == 3
    for k, config in enumerate(configs):
        np.testing.assert_array_equal(config.numbers, [6, 1, 1, 8])
        np.testing.assert_allclose(config.positions, data["coords"][k])
        assert config.energy == pytest.approx(data["energies"][k] * 0.0433641, rel=1e-5)
        np.testing.assert_allclose(config.forces, data["forces"][k] * KCAL_PER_MOL)
        assert config.frame == k and not config.pbc.any() and config.stress is None
    assert [c.frame for c in read_configurations(path, index="-1")] == [2]


def test_label_keys_do_not_apply_to_npz(tmp_path):
    """An npz is read by the (r)MD17 names and units: a label key set for one would silently not apply."""
    path = tmp_path / "rmd17.npz"
    write_rmd17(path)
    with pytest.raises(DataError, match="label keys do not apply to an npz file \\(energy_key 'old_energies'\\)"):
        read_configurations(path, energy_key="old_energies")


def test_a_missing_label_lists_the_names_the_frame_carries(tmp_path):
    path = tmp_path / "h2.xyz"
    path.write_text("2\nenergy=1.0 Properties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.74\n")
    with pytest.raises(DataError, match=r"energy label missing \(the frame carries \['energy'\]\)"):
        read_configurations(path, energy_key="REF_energy")


def test_original_md17_keys(tmp_path):
    path = tmp_path / "md17.npz"
    rng = np.random.default_rng(2)
    energies = rng.normal(size=(2, 1))
    np.savez(path, z=np.array([1, 1]), R=rng.uniform(0, 2, (2, 2, 3)), E=energies, F=np.zeros((2, 2, 3)))
    configs = read_configurations(path)
    assert [c.energy for c in configs] == pytest.approx(energies[:, 0] * KCAL_PER_MOL)


def test_real_rmd17_ethanol():
    path = SHARED_DATA / "rmd17" / "rmd17_ethanol_train_01.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    configs = read_configurations(path, index=":5", require_forces=True)
    assert len(configs) == 5
    assert sorted(configs[0].numbers.tolist()) == [1] * 6 + [6] * 2 + [8]
    # ethanol PBE/def2-SVP total energy is about -97080 kcal/mol, i.e. about -4210 eV
    assert -4215 < configs[0].energy < -4205
    assert np.abs(configs[0].forces).max() < 20  # eV/Å, not kcal/mol/Å
    graph = config_to_graph(configs[0], cutoff=5.0)
    assert graph["edge_index"].shape[1] == 9 * 8


def test_real_ethanol_botnet_extxyz():
    path = SHARED_DATA / "ethanol_botnet" / "train.xyz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    configs = read_configurations(path, index=":5", require_forces=True)
    assert len(configs) == 5 and configs[0].n_atoms == 9
    assert configs[0].config_type == "Training_set"
    assert -4215 < configs[0].energy < -4205
    isolated = read_configurations(SHARED_DATA / "ethanol_botnet" / "isolated_atoms.xyz")
    assert all(c.n_atoms == 1 and c.config_type == "isolated_atom" for c in isolated)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.xyz"
    with pytest.raises(DataError, match="not found") as err:
        read_configurations(path)
    assert_data_error(err, path, None)


@pytest.mark.parametrize("name, content", [
    ("corrupt.xyz", "3\nLattice=\"1 0 0\" Properties=species:S:1:pos:R:3\nCu 0 0\n"),
    ("corrupt.xyz", "not a number\n\nCu 0 0 0\n"),
    ("corrupt.npz", "this is not a zip file"),
    ("corrupt.db", "this is not sqlite either, not at all, and it is long enough to hold a header"),
])
def test_corrupt_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="cannot read") as err:
        read_configurations(path)
    assert_data_error(err, path, None)
    assert err.value.__cause__ is not None


def test_unparsable_frame_is_named(tmp_path):
    """A long file broken in one frame: the error says which frame, not only which token."""
    path = tmp_path / "long.xyz"
    ase.io.write(path, [molecule("H2O")] * 3, format="extxyz")
    lines = path.read_text().splitlines()
    lines[2 * 5 + 3] = "H 0.0 x 0.0"  # frame 2 of 5-line frames (3 atoms + 2 header lines), second atom
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="cannot read") as err:
        read_configurations(path, require_energy=False, require_forces=False)
    assert_data_error(err, path, None, frame=2)
    assert err.value.frame == 2


def write_one(tmp_path: Path, atoms: Atoms, **results) -> Path:
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    path = tmp_path / "bad.xyz"
    ase.io.write(path, [molecule("H2O"), atoms], format="extxyz")  # the bad one is frame 1
    return path


def test_missing_energy_and_forces(tmp_path):
    path = write_one(tmp_path, molecule("H2O"))
    with pytest.raises(DataError, match="missing") as err:
        read_configurations(path, index="1:")
    assert_data_error(err, path, "energy", frame=1)
    with pytest.raises(DataError, match="missing") as err:
        read_configurations(path, index="1:", require_energy=False, require_forces=True)
    assert_data_error(err, path, "forces", frame=1)
    configs = read_configurations(path, require_energy=False)
    assert configs[1].energy is None and configs[1].forces is None


@pytest.mark.parametrize("field", ["energy", "forces", "stress", "positions"])
def test_nan_labels(tmp_path, field):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    results = dict(energy=-1.0, forces=np.zeros((4, 3)), stress=np.zeros(6))
    if field == "positions":
        atoms.positions[2, 1] = np.nan
    elif field == "energy":
        results["energy"] = np.inf
    else:
        results[field] = np.full_like(results[field], np.nan)
    atoms.calc = SinglePointCalculator(atoms, **results)
    path = tmp_path / "nan.xyz"
    ase.io.write(path, [bulk("Cu"), atoms], format="extxyz")
    with pytest.raises(DataError, match="NaN") as err:
        read_configurations(path, index="1:")
    assert_data_error(err, path, field, frame=1)


def test_frame_without_atoms(tmp_path):
    path = tmp_path / "empty_frame.xyz"
    path.write_text("1\nenergy=-1.0\nH 0 0 0\n0\nenergy=-2.0\n")
    with pytest.raises(DataError, match="no atoms") as err:
        read_configurations(path)
    assert_data_error(err, path, "numbers", frame=1)


def test_ghost_atom_is_named(tmp_path):
    """ASE's ghost atom 'X' (atomic number 0) has no mass or reference energy: refused at read, frame named
    (before, training refused "elements [0, 1, 8]" without saying which frame held it)."""
    good = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    ghost = good.copy()
    ghost.numbers[1] = 0
    for atoms in (good, ghost):
        atoms.info["E"] = -1.0
    path = tmp_path / "ghost.xyz"
    ase.io.write(path, [good, ghost], format="extxyz")
    with pytest.raises(DataError, match="atom 1 has atomic number 0") as err:
        read_configurations(path, energy_key="E", require_forces=False)
    assert_data_error(err, path, "numbers", frame=1)
    from equiforce.data.io import check_structures

    with pytest.raises(DataError, match="atomic number 0") as err:
        check_structures([good, ghost], path, cutoff=4.0)
    assert_data_error(err, path, "numbers", frame=1)


def test_forces_wrong_shape(tmp_path):
    atoms = molecule("H2O")
    atoms.info["energy_x"] = 1.0
    atoms.info["forces_x"] = np.zeros(6)  # a per-config vector, not [n, 3]
    path = tmp_path / "shape.xyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.raises(DataError, match="shape") as err:
        read_configurations(path, energy_key="energy_x", forces_key="forces_x")
    assert_data_error(err, path, "forces_x", frame=0)


def test_stress_wrong_size(tmp_path):
    atoms = bulk("Cu", cubic=True)
    atoms.info["energy_x"] = 1.0
    atoms.info["stress_x"] = np.zeros(4)
    path = tmp_path / "stress.xyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.raises(DataError, match="components") as err:
        read_configurations(path, energy_key="energy_x", stress_key="stress_x")
    assert_data_error(err, path, "stress_x", frame=0)


@pytest.mark.parametrize("missing", ["nuclear_charges", "coords", "energies"])
def test_npz_missing_key(tmp_path, missing):
    path = tmp_path / "partial.npz"
    write_rmd17(path, **{missing: None})
    with pytest.raises(DataError, match="none of the keys") as err:
        read_configurations(path)
    assert_data_error(err, path, missing)


def test_npz_optional_forces_and_bad_values(tmp_path):
    path = tmp_path / "noforces.npz"
    write_rmd17(path, forces=None)
    assert read_configurations(path)[0].forces is None
    with pytest.raises(DataError, match="none of the keys") as err:
        read_configurations(path, require_forces=True)
    assert_data_error(err, path, "forces")

    path = tmp_path / "nan.npz"
    energies = np.array([-1.0, np.nan, -2.0])
    write_rmd17(path, energies=energies)
    with pytest.raises(DataError, match="NaN") as err:
        read_configurations(path)
    assert_data_error(err, path, "energies", frame=1)

    path = tmp_path / "shape.npz"
    write_rmd17(path, forces=np.zeros((3, 5, 3)))
    with pytest.raises(DataError, match="does not match") as err:
        read_configurations(path)
    assert_data_error(err, path, "forces")


# ---------------------------------------------------------------------------------------------- graph checks


def test_graph_rejects_overlapping_atoms():
    config = Configuration(numbers=[1, 1, 8], positions=[[0, 0, 0], [1, 0, 0], [1, 0, 0]], source="dup.xyz",
                           frame=4)
    with pytest.raises(DataError, match="same position") as err:
        config_to_graph(config, cutoff=3.0)
    message = str(err.value)
    assert "dup.xyz" in message and "frame 4" in message and "'positions'" in message


def test_graph_rejects_empty_frame():
    config = Configuration(numbers=np.zeros(0), positions=np.zeros((0, 3)), source="empty.xyz", frame=2)
    with pytest.raises(DataError, match="no atoms") as err:
        config_to_graph(config, cutoff=3.0)
    message = str(err.value)
    assert "empty.xyz" in message and "frame 2" in message and "'numbers'" in message


def test_index_out_of_range(tmp_path):
    path = tmp_path / "mol.npz"
    write_rmd17(path)
    with pytest.raises(DataError, match="out of range") as err:
        read_configurations(path, index=7)
    assert_data_error(err, path, None)
    xyz = tmp_path / "cu.xyz"
    ase.io.write(xyz, emt_frames(2), format="extxyz")
    with pytest.raises(DataError) as err:
        read_configurations(xyz, index=-5)
    assert_data_error(err, xyz, None)


@pytest.mark.parametrize("cell, pbc, message", [
    (np.zeros((3, 3)), [True, True, True], "cell vector 0 is zero"),
    (np.diag([5.0, 5.0, 0.0]), [True, True, True], "cell vector 2 is zero"),
    (np.diag([0.1, 10.0, 10.0]), [True, False, False], "would need 50 periodic images"),
])
def test_graph_rejects_unusable_cells(cell, pbc, message):
    config = Configuration(numbers=[29], positions=[[0.0, 0.0, 0.0]], cell=cell, pbc=pbc, source="bad.xyz", frame=7)
    with pytest.raises(DataError, match=f"file bad.xyz, frame 7, field 'cell': .*{message}"):
        config_to_graph(config, cutoff=5.0)


def test_truncated_extxyz_names_its_broken_frame(tmp_path):
    """An interrupted write cuts the last frame short: ASE's XYZError is an OSError, yet the frame is named."""
    path = tmp_path / "truncated.xyz"
    ase.io.write(path, emt_frames(3), format="extxyz")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")  # the third frame (frame 2) lost its last two atoms
    with pytest.raises(DataError, match="cannot read") as err:
        read_configurations(path)
    assert err.value.frame == 2


def test_index_past_the_end_says_how_many_frames_there_are(tmp_path):
    path = tmp_path / "cu.xyz"
    ase.io.write(path, emt_frames(2), format="extxyz")
    with pytest.raises(DataError, match=r"index 7 is out of range: the file has 2 frames") as err:
        read_configurations(path, index=7)
    assert_data_error(err, path, None)


def test_format_named_where_the_file_name_does_not_say_it(tmp_path):
    path = tmp_path / "frames.dat"
    ase.io.write(path, emt_frames(2), format="extxyz")
    assert len(read_configurations(path, format="extxyz")) == 2
    with pytest.raises(DataError, match=r"guessed from the file; name the format"):
        read_configurations(path)


@pytest.mark.parametrize("override, message", [
    ({"energies": np.array(["a", "b", "c"])}, "not real numbers"),
    ({"nuclear_charges": np.array([6.4, 1, 1, 8])}, "whole numbers from 1 to 118, found 6.4"),
    ({"nuclear_charges": np.array([-6, 1, 1, 8])}, "whole numbers from 1 to 118, found -6"),
])
def test_npz_arrays_that_are_not_what_they_claim_are_named(tmp_path, override, message):
    path = tmp_path / "bad.npz"
    write_rmd17(path, **override)
    with pytest.raises(DataError, match=message) as err:
        read_configurations(path)
    assert_data_error(err, path, next(iter(override)))

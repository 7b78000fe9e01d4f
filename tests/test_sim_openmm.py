"""The OpenMM bridge (skipped when OpenMM is not installed): the same numbers as the ASE calculator through
OpenMM's units, particle subsets for ML/MM, periodic boxes, energy conservation, σ, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import equiforce
from equiforce.errors import UnknownElementError
from equiforce.models.file import save_model
from equiforce.sim.openmm_force import EV_IN_KJ_PER_MOL, openmm_force, openmm_system
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401

openmm = pytest.importorskip("openmm")
pytest.importorskip("openmm.app")  # loads openmm.app (Simulation, reporters)
if not hasattr(openmm, "PythonForce"):
    pytest.skip("OpenMM without PythonForce (< 8.6)", allow_module_level=True)
unit = openmm.unit
KJ_PER_MOL_ANGSTROM = unit.kilojoule_per_mole / unit.angstrom


def _context(system, dt_ps: float = 0.0005):
    return openmm.Context(system, openmm.VerletIntegrator(dt_ps), openmm.Platform.getPlatformByName("Reference"))


def _energy_forces(context) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) from OpenMM."""
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
    forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(KJ_PER_MOL_ANGSTROM)) / EV_IN_KJ_PER_MOL
    return energy, forces


@pytest.fixture(scope="module")
def model():
    return make_model("small")


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_molecule_matches_the_ase_calculator(dtype, tol, tmp_path):
    model = make_model("small", dtype=dtype)
    atoms = _ethanol()
    path = save_model(model, tmp_path / "m.eqf")
    system, positions, _, _ = openmm_system(atoms, path)  # from the model file, as a user would
    context = _context(system)
    context.setPositions(positions)
    energy, forces = _energy_forces(context)  # float64 arrays to OpenMM even from a float32 model
    atoms.calc = equiforce.Calculator(model)
    assert energy == pytest.approx(atoms.get_potential_energy(), abs=tol)
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=tol)


def test_periodic_box_is_rotated_into_openmm_form_and_matches(model):
    cu = bulk("Cu", "fcc", a=3.6).repeat((4, 4, 4))  # primitive cell: not lower triangular
    cu.numbers[::5] = 28
    cu.rattle(0.05, seed=2)
    system, positions, _, _ = openmm_system(cu, model)
    context = _context(system)
    context.setPositions(positions)
    energy, forces = _energy_forces(context)
    _, rotation = cu.cell.standard_form()
    cu.calc = equiforce.Calculator(model)
    assert energy == pytest.approx(cu.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(forces, cu.get_forces() @ rotation.T, atol=1e-9)
    # a changed box (as a barostat makes it) reaches the model: compressed, the energy follows the calculator
    box = np.asarray(cu.cell.standard_form()[0]) * 0.98
    context.setPeriodicBoxVectors(*(openmm.Vec3(*row / 10.0) for row in box))
    context.setPositions(positions * 0.98)
    energy_small, _ = _energy_forces(context)
    squeezed = cu.copy()
    squeezed.set_cell(cu.cell * 0.98, scale_atoms=True)
    squeezed.calc = equiforce.Calculator(model)
    assert energy_small == pytest.approx(squeezed.get_potential_energy(), abs=1e-8)
    assert abs(energy_small - energy) > 1e-3


def test_model_on_a_subset_of_particles_for_ml_mm(model):
    atoms = _ethanol()
    system = openmm.System()
    for _ in range(3):  # particles of the "MM" part, left to other forces
        system.addParticle(16.0)
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    system.addForce(openmm_force(model, atoms.numbers, particles=range(3, 3 + len(atoms))))
    context = _context(system)
    context.setPositions(np.vstack([np.full((3, 3), 2.0), atoms.positions / 10.0]) * unit.nanometer)
    energy, forces = _energy_forces(context)
    atoms.calc = equiforce.Calculator(model)
    assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(forces[3:], atoms.get_forces(), atol=1e-9)
    assert np.all(forces[:3] == 0.0)


def test_openmm_verlet_conserves_energy(model):
    atoms = _ethanol()
    system, positions, _, _ = openmm_system(atoms, model)
    integrator = openmm.VerletIntegrator(0.0001)  # 0.1 fs
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300.0, 3)

    def total() -> tuple[float, float]:
        state = context.getState(getEnergy=True)
        kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        return kinetic + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), kinetic

    start, kinetic0 = total()
    kinetic = [kinetic0]
    totals = [start]
    for _ in range(10):
        integrator.step(30)
        energy, k = total()
        totals.append(energy)
        kinetic.append(k)
    assert np.isfinite(totals).all()
    assert np.ptp(kinetic) > 0.5  # the model's forces did move the atoms
    assert np.ptp(totals) < 0.02 * np.ptp(kinetic)


def test_uncertainty_is_reported_after_each_call():
    from tests.uq_helpers import ensemble

    members = ensemble(2, "small")
    atoms = _ethanol()
    system, positions, potential, _ = openmm_system(atoms, members)
    context = _context(system)
    context.setPositions(positions)
    energy, _ = _energy_forces(context)
    last = potential.last
    calc = equiforce.Calculator(members)
    atoms.calc = calc
    assert last["energy"] == pytest.approx(energy, abs=1e-9) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    assert last["energy_std"] == pytest.approx(calc.results["energy_std"], rel=1e-9)
    assert last["max_forces_std"] == pytest.approx(float(np.max(calc.results["forces_std"])), rel=1e-9)


def test_bad_input_gets_clear_errors(model):
    gold = molecule("CH4")
    gold.numbers[0] = 79
    with pytest.raises(UnknownElementError, match="Au"):
        openmm_system(gold, model)
    with pytest.raises(ValueError, match="2 particles but 3 atomic numbers"):
        openmm_force(model, [1, 1, 8], particles=[0, 1])
    slab = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="periodic in all three"):
        openmm_system(slab, model)
    # the force's particles changed after it was made: named, not a shape error deep in torch
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    force = openmm_force(model, [1, 1, 8])
    force.setParticles([0, 1])
    system.addForce(force)
    context = _context(system)
    context.setPositions(np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]]) * unit.nanometer)
    with pytest.raises(Exception, match="OpenMM passed 2 particles but the model covers 3"):
        context.getState(getEnergy=True)
    # atoms on top of each other: the model's NaN stops OpenMM with a message, not a silent NaN trajectory
    system, _, _, _ = openmm_system(molecule("H2O"), model)
    context = _context(system)
    context.setPositions(np.zeros((3, 3)) * unit.nanometer)
    with pytest.raises(Exception, match="OpenMM: the model gave a non-finite energy or force at call 1"):
        context.getState(getEnergy=True)


def test_sigma_reporter_logs_and_stops_a_simulation(tmp_path):
    from equiforce.sim.openmm_force import SigmaReporter, UncertaintyExceeded
    from tests.uq_helpers import ensemble

    members = ensemble(2, "small")
    atoms = _ethanol()
    setup = openmm_system(atoms, members)
    simulation = openmm.app.Simulation(setup.topology, setup.system, openmm.LangevinMiddleIntegrator(500, 1.0, 0.0002),
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(setup.positions)
    potential = setup.potential
    log = tmp_path / "sigma.csv"
    reporter = SigmaReporter(potential, interval=5, file=log)
    simulation.reporters.append(reporter)
    simulation.step(20)
    assert [row[0] for row in reporter.rows] == [5, 10, 15, 20]
    assert all(row[4] > 0 for row in reporter.rows)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("step,time_ps") and len(lines) == 5
    # a threshold below the σ the model has here stops the run at the next report, naming step and σ
    simulation.reporters[:] = [SigmaReporter(potential, interval=5, max_forces_std=1e-6)]
    with pytest.raises(UncertaintyExceeded, match="step 25 .* max force σ"):
        simulation.step(20)
    reporter.close()
    # a model without σ: the reporter says so instead of logging nothing
    setup = openmm_system(atoms, make_model("small"))
    simulation = openmm.app.Simulation(setup.topology, setup.system, openmm.VerletIntegrator(0.0002),
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(setup.positions)
    simulation.reporters.append(SigmaReporter(setup.potential, interval=2))
    with pytest.raises(KeyError, match="needs a model with uncertainty"):
        simulation.step(2)


def test_npt_with_openmm_barostat_and_pdb_reporter(model, tmp_path):
    """OpenMM's Monte Carlo barostat rescales the box between calls; every energy still equals the calculator's
    at the box and positions OpenMM reports, and the topology serves OpenMM's own trajectory reporters."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    cu.rattle(0.02, seed=3)
    setup = openmm_system(cu, model)
    setup.system.addForce(openmm.MonteCarloBarostat(1000.0, 300.0, 2))  # bar, K, every 2 steps
    simulation = openmm.app.Simulation(setup.topology, setup.system,
                                       openmm.LangevinMiddleIntegrator(300, 5.0, 0.001),
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(setup.positions)
    simulation.reporters.append(openmm.app.PDBReporter(str(tmp_path / "traj.pdb"), 5))
    start_box = simulation.context.getState().getPeriodicBoxVolume()
    simulation.step(20)
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    assert state.getPeriodicBoxVolume() != start_box  # the barostat acted
    final = cu.copy()
    final.set_cell(np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.angstrom)))
    final.positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
    final.calc = equiforce.Calculator(model)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
    assert energy == pytest.approx(final.get_potential_energy(), abs=1e-8)
    assert (tmp_path / "traj.pdb").read_text().count("MODEL") == 4


def _classical_system(ligand, environment: int):
    """A hand-made force field: the ligand's bonds, angles, torsions and nonbonded terms (1-2 and 1-3 pairs
    excluded, 1-4 scaled), plus ``environment`` charged LJ particles; no cutoff, so energies split exactly."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    n = len(ligand)
    system = openmm.System()
    for mass in ligand.get_masses():
        system.addParticle(float(mass))
    for _ in range(environment):
        system.addParticle(16.0)
    i, j = neighbor_list("ij", ligand, natural_cutoffs(ligand))
    bonds = sorted({(int(a), int(b)) for a, b in zip(i, j) if a < b})
    neighbours = {k: {b for a, b in bonds if a == k} | {a for a, b in bonds if b == k} for k in range(n)}
    bond_force, angle_force, torsion_force = (openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(),
                                              openmm.PeriodicTorsionForce())
    for a, b in bonds:
        bond_force.addBond(a, b, 0.11, 3e5)
    for centre in range(n):
        ends = sorted(neighbours[centre])
        for x, a in enumerate(ends):
            for b in ends[x + 1:]:
                angle_force.addAngle(a, centre, b, 1.9, 400.0)
    for b, c in bonds:
        for a in neighbours[b] - {c}:
            for d in neighbours[c] - {b, a}:
                torsion_force.addTorsion(a, b, c, d, 3, 0.0, 1.5)
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    rng = np.random.default_rng(0)
    charges = rng.normal(0, 0.2, n)
    for q in charges - charges.mean():
        nonbonded.addParticle(float(q), 0.3, 0.4)
    for k in range(environment):
        nonbonded.addParticle(0.3 * (-1) ** k, 0.32, 0.6)
    nonbonded.createExceptionsFromBonds(bonds, 0.5, 0.5)
    for force in (bond_force, angle_force, torsion_force, nonbonded, openmm.CMMotionRemover()):
        system.addForce(force)
    return system


def test_mixed_system_replaces_the_force_field_inside_the_ml_region_only(model):
    from equiforce.sim.openmm_force import openmm_mixed_system

    ligand = _ethanol()
    env = np.array([[4.0, 0.0, 0.0], [0.0, 4.5, 0.5], [-3.5, -2.0, 1.0]])  # Å, near enough to interact
    positions = np.vstack([ligand.positions, env]) / 10.0 * unit.nanometer
    full = _classical_system(ligand, len(env))
    alone = _classical_system(ligand, 0)
    mixed, potential = openmm_mixed_system(full, range(len(ligand)), ligand.numbers, model)

    def energy_forces(system, pos):
        context = _context(system)
        context.setPositions(pos)
        return _energy_forces(context)

    e_mixed, f_mixed = energy_forces(mixed, positions)
    e_full, f_full = energy_forces(full, positions)
    e_alone, f_alone = energy_forces(alone, ligand.positions / 10.0 * unit.nanometer)
    ligand.calc = equiforce.Calculator(model)
    e_ml, f_ml = ligand.get_potential_energy(), ligand.get_forces()
    n = len(ligand)
    assert abs(e_full - e_alone) > 1e-3  # the environment does interact with the ligand
    assert e_mixed == pytest.approx(e_ml + e_full - e_alone, abs=1e-6)
    np.testing.assert_allclose(f_mixed[:n], f_ml + f_full[:n] - f_alone, atol=1e-6)
    np.testing.assert_allclose(f_mixed[n:], f_full[n:], atol=1e-6)
    assert potential.last["energy"] == pytest.approx(e_ml, abs=1e-9)
    assert full.getNumForces() == 5 and mixed.getNumForces() == 6  # the original is left untouched


def test_mixed_system_refuses_forces_it_cannot_split(model):
    from equiforce.sim.openmm_force import openmm_mixed_system

    ligand = _ethanol()
    system = _classical_system(ligand, 1)
    restraint = openmm.CustomExternalForce("k*(x^2+y^2+z^2)")
    restraint.addGlobalParameter("k", 1.0)
    restraint.addParticle(len(ligand), [])
    system.addForce(restraint)
    with pytest.raises(ValueError, match="CustomExternalForce"):
        openmm_mixed_system(system, range(len(ligand)), ligand.numbers, model)
    mixed, _ = openmm_mixed_system(system, range(len(ligand)), ligand.numbers, model, keep=["CustomExternalForce"])
    assert mixed.getNumForces() == system.getNumForces() + 1
    with pytest.raises(ValueError, match="twice"):
        openmm_mixed_system(system, [0, 0], [1, 1], model)

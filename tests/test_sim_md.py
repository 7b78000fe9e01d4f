"""The native batched MD engine: conservation, thermostats, equipartition, barostat, batching, stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.verlet import VelocityVerlet as AseVerlet

import equiforce
from equiforce.data import keys as K
from equiforce.sim.integrators import CSVR, Langevin, StochasticCellRescaling, VelocityVerlet, pressure
from equiforce.sim.md import MolecularDynamics, run_md
from equiforce.sim.state import KB, SimState, maxwell_boltzmann
from tests.conftest import make_model
from tests.sim_models import Free, LennardJones, Tether, argon_fcc, single_thread  # noqa: F401


def _series(result, key, system=0):
    return np.array([row[key] for row in result.thermo if row["system"] == system])


def test_nve_conserves_energy_and_matches_ase_verlet():
    """Same trajectory as ASE's VelocityVerlet with the ASE calculator, and energy conserved."""
    model = make_model("L1-corr3")
    atoms = molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    atoms.set_momenta(rng.normal(0, 0.3, (len(atoms), 3)) * atoms.get_masses()[:, None] ** 0.5)
    atoms.set_momenta(atoms.get_momenta() - atoms.get_momenta().mean(0))
    reference = atoms.copy()
    reference.calc = equiforce.Calculator(model)
    AseVerlet(reference, 0.2 * units.fs).run(40)
    result = run_md(model, atoms, ensemble="nve", timestep_fs=0.2, steps=40, log_interval=1)
    final = result.atoms[0]
    np.testing.assert_allclose(final.positions, reference.positions, atol=1e-9)
    np.testing.assert_allclose(final.get_momenta(), reference.get_momenta(), atol=1e-9)
    etot = _series(result, "etot")
    assert np.ptp(etot) < 0.005 * np.ptp(_series(result, "epot"))


def test_nve_energy_drift_is_second_order_in_timestep():
    """Halving dt reduces the energy fluctuation ~4×: the integrator is symplectic and second order."""
    model = LennardJones()
    atoms = argon_fcc(2, rattle=0.05)
    spreads = []
    for dt in (8.0, 4.0):
        start = atoms.copy()
        start.set_momenta(np.zeros((len(atoms), 3)))
        result = run_md(model, start, ensemble="nve", timestep_fs=dt, steps=int(400 / dt), log_interval=1)
        spreads.append(np.ptp(_series(result, "etot")))
    assert spreads[1] < spreads[0] / 2.5
    assert spreads[1] < 1e-4 * len(atoms)


def test_batched_equals_single_and_periodic_mix():
    """A batch of a molecule and a periodic crystal evolves exactly as each alone."""
    model = make_model("L1-corr3")
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.numbers[1] = 28
    cu.rattle(0.03, seed=1)
    systems = [molecule("H2O"), cu, molecule("CH4")]
    rng = np.random.default_rng(3)
    for a in systems:
        a.set_momenta(rng.normal(0, 0.1, (len(a), 3)))
    batch = run_md(model, [a.copy() for a in systems], ensemble="nve", timestep_fs=0.5, steps=15)
    for b, a in enumerate(systems):
        alone = run_md(model, a.copy(), ensemble="nve", timestep_fs=0.5, steps=15)
        np.testing.assert_allclose(batch.atoms[b].positions, alone.atoms[0].positions, atol=1e-10)
        np.testing.assert_allclose(batch.atoms[b].get_momenta(), alone.atoms[0].get_momenta(), atol=1e-10)


def _tethered(n_copies: int = 4, k: float = 5.0):
    """Water molecules on harmonic tethers: every degree of freedom an independent oscillator."""
    atoms = [molecule("H2O") for _ in range(n_copies)]
    for i, a in enumerate(atoms):
        a.positions += 10.0 * i
    sites = torch.as_tensor(np.concatenate([a.positions for a in atoms]))
    return atoms, Tether(sites, k=k)


def test_langevin_reaches_temperature_with_equipartition():
    """Start cold and reach T; then ⟨K⟩ of light (H) and heavy (O) atoms and ⟨U⟩ of the harmonic tethers
    all equal (3/2) kT per atom — kinetic and configurational equipartition."""
    target = 300.0
    atoms, model = _tethered(16)
    state = SimState.from_atoms(atoms)
    maxwell_boltzmann(state, 5.0, generator=torch.Generator().manual_seed(0), remove_com=False)
    md = MolecularDynamics(model, Langevin(1.0, target, 0.05, generator=torch.Generator().manual_seed(1)))
    warm = md.run(state, 100, log_interval=100)
    assert warm.thermo[0]["temperature"] < 10
    kinetic = {1: [], 8: []}
    epot, temps = [], []
    for _ in range(25):
        result = md.run(state, 20, log_interval=20)
        last = [r for r in result.thermo if r["step"] == state.step]
        temps.append(np.mean([r["temperature"] for r in last]))
        epot.append(np.sum([r["epot"] for r in last]))
        per_atom = 0.5 * (state.momenta**2).sum(-1) / state.masses
        for z in kinetic:
            kinetic[z].append(float(per_atom[state.numbers == z].mean()))
    unit = 1.5 * KB * target
    assert np.mean(temps) == pytest.approx(target, rel=0.06)
    assert np.mean(epot) / (unit * len(state.numbers)) == pytest.approx(1.0, rel=0.1)
    for z, values in kinetic.items():
        assert np.mean(values) / unit == pytest.approx(1.0, rel=0.12), z


def test_csvr_samples_canonical_kinetic_energy():
    """CSVR reaches T and its kinetic-energy fluctuations are canonical: std(T)/T = sqrt(2/N_f)."""
    target = 60.0
    atoms = argon_fcc(2, rattle=0.05, seed=3)
    result = run_md(LennardJones(), [atoms.copy() for _ in range(4)], ensemble="nvt-csvr", temperature_K=target,
                    timestep_fs=5.0, steps=600, initial_temperature_K=5.0, tau_fs=50.0, seed=2, log_interval=2)
    temps = np.array([r["temperature"] for r in result.thermo if r["step"] >= 150])
    assert temps.mean() == pytest.approx(target, rel=0.05)
    dof = 3 * len(atoms) - 3
    assert temps.std() / target == pytest.approx(np.sqrt(2 / dof), rel=0.25)


def test_csvr_conserves_effective_energy():
    """E_total minus the heat the thermostat removed stays constant (Bussi et al. 2007)."""
    model = LennardJones()
    atoms = argon_fcc(2, rattle=0.1, seed=2)
    result = run_md(model, atoms, ensemble="nvt-csvr", temperature_K=60.0, timestep_fs=4.0, steps=150,
                    tau_fs=40.0, seed=0, log_interval=1)
    conserved, etot = _series(result, "conserved"), _series(result, "etot")
    assert np.ptp(etot) > 10 * np.ptp(conserved)
    assert np.ptp(conserved) < 2e-3


def test_npt_ideal_gas_volume():
    """Ideal gas under stochastic cell rescaling: ⟨V⟩ = N k T / P (the kT/V term gives the +1, COM the −1)."""
    n, temperature, p_bar = 27, 300.0, 2000.0
    rng = np.random.default_rng(0)
    volume0 = n * KB * temperature / (p_bar * units.bar)
    length = volume0 ** (1 / 3)
    systems = [Atoms("Ar" * n, positions=rng.uniform(0, length, (n, 3)), cell=[length] * 3, pbc=True)
               for _ in range(32)]
    result = run_md(Free(), systems, ensemble="npt", temperature_K=temperature, pressure_bar=p_bar,
                    timestep_fs=5.0, steps=500, tau_fs=20.0, tau_p_fs=200.0, compressibility_per_bar=1e-3,
                    seed=4, log_interval=5, skin=1.5)
    rows = [r for r in result.thermo if r["step"] > 100]
    mean_volume = np.mean([r["volume"] for r in rows])
    assert mean_volume / volume0 == pytest.approx(1.0, rel=0.06)
    assert np.mean([r["pressure_bar"] for r in rows]) == pytest.approx(p_bar, rel=0.1)


def test_npt_argon_relaxes_to_target_pressure():
    """A compressed LJ crystal expands until its mean pressure is the target's."""
    model = LennardJones()
    atoms = argon_fcc(2, a=5.10)
    result = run_md(model, atoms, ensemble="npt", temperature_K=40.0, pressure_bar=0.0, timestep_fs=5.0,
                    steps=800, tau_fs=50.0, tau_p_fs=300.0, compressibility_per_bar=3e-4, seed=0, log_interval=5,
                    skin=1.0)
    pressures = _series(result, "pressure_bar")
    volumes = _series(result, "volume")
    assert pressures[0] > 3000  # compressed start
    assert volumes[-1] > 1.05 * volumes[0]
    late = pressures[len(pressures) // 2:]
    assert abs(late.mean()) < 300  # from > 3000 bar; the fluctuations of 32 atoms are ≈ 400 bar


def test_pressure_matches_stress_and_kinetic_term():
    model = LennardJones()
    state = SimState.from_atoms(argon_fcc(2, rattle=0.1))
    maxwell_boltzmann(state, 100.0, generator=torch.Generator().manual_seed(0))
    md = MolecularDynamics(model, StochasticCellRescaling(1.0, 100.0))
    out = md.evaluate(state, compute_stress=True)
    volume = float(state.volume()[0])
    expected = -torch.diagonal(out[K.STRESS][0]).sum() / 3 + 2 * state.kinetic_energy()[0] / (3 * volume)
    assert float(pressure(state, out)[0]) == pytest.approx(float(expected), rel=1e-12)


def test_stop_when_freezes_only_flagged_systems():
    model = make_model("L1-corr3")
    systems = [molecule("H2O"), molecule("CH4"), molecule("H2O")]

    def stop(state, outputs):
        return torch.arange(state.n_systems) == 1 if state.step >= 5 else torch.zeros(state.n_systems, dtype=bool)

    frozen = run_md(model, [a.copy() for a in systems], ensemble="nve", temperature_K=300, steps=12, seed=0,
                    stop_when=stop, log_interval=1)
    assert frozen.stopped_step.tolist() == [-1, 5, -1]
    rows = [r for r in frozen.thermo if r["system"] == 1 and r["step"] >= 5]
    assert all(r["stopped"] for r in rows)
    positions = [tuple(np.round(a.positions.ravel(), 12)) for a in [frozen.atoms[1]]]
    steps5 = run_md(model, [a.copy() for a in systems], ensemble="nve", temperature_K=300, steps=4, seed=0)
    np.testing.assert_allclose(np.array(positions[0]).reshape(-1, 3), steps5.atoms[1].positions, atol=1e-12)
    free = run_md(model, [a.copy() for a in systems], ensemble="nve", temperature_K=300, steps=12, seed=0)
    np.testing.assert_allclose(frozen.atoms[0].positions, free.atoms[0].positions, atol=1e-12)
    flagged = run_md(model, [a.copy() for a in systems], ensemble="nve", temperature_K=300, steps=12, seed=0,
                     stop_when=stop, stop_mode="flag")
    assert flagged.stopped_step.tolist() == [-1, 5, -1]
    np.testing.assert_allclose(flagged.atoms[1].positions, free.atoms[1].positions, atol=1e-12)


def test_nonfinite_system_is_frozen_not_spread():
    model = LennardJones()
    good = argon_fcc(1, rattle=0.05)
    bad = argon_fcc(1)
    bad.positions[1] = bad.positions[0] + [1e-4, 0, 0]  # overlapping atoms: r⁻¹² blows up
    result = run_md(model, [good, bad], ensemble="nve", temperature_K=10.0, timestep_fs=2.0, steps=10, seed=0)
    assert result.nonfinite_step[0] == -1 and result.nonfinite_step[1] >= 1
    assert np.all(np.isfinite(result.atoms[0].positions))
    assert np.all(np.isfinite(result.atoms[1].positions))


def test_model_dtype_and_element_are_checked():
    model = make_model("L1-corr3")
    with pytest.raises(equiforce.errors.UnknownElementError, match="Au"):
        run_md(model, Atoms("Au2", positions=[[0, 0, 0], [2.5, 0, 0]]), steps=1)
    state = SimState.from_atoms(molecule("H2O"), dtype=torch.float32)
    with pytest.raises(ValueError, match="float32"):
        MolecularDynamics(model, VelocityVerlet(1.0)).run(state, 1)


def test_float32_model_runs():
    model = make_model("L1-corr3", dtype=torch.float32)
    result = run_md(model, molecule("CH3CH2OH"), ensemble="nvt-csvr", steps=5, seed=0)
    assert result.state.dtype == torch.float32
    assert np.isfinite(result.thermo[-1]["etot"])


def test_integrators_reject_bad_timestep():
    with pytest.raises(ValueError):
        CSVR(0.0, 300.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_run_matches_cpu():
    """The engine on CUDA (neighbour lists, integrator, stop hooks) gives the CPU trajectory."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    cu.rattle(0.03, seed=0)
    systems = [molecule("CH3CH2OH"), cu]
    rng = np.random.default_rng(0)
    for a in systems:
        a.set_momenta(rng.normal(0, 0.1, (len(a), 3)))
    cpu = run_md(make_model("L1-corr3"), [a.copy() for a in systems], ensemble="nvt-csvr", steps=20, seed=None)
    gpu = run_md(make_model("L1-corr3").to("cuda"), [a.copy() for a in systems], ensemble="nve", steps=20,
                 device="cuda")
    ref = run_md(make_model("L1-corr3"), [a.copy() for a in systems], ensemble="nve", steps=20)
    for b in range(2):
        np.testing.assert_allclose(gpu.atoms[b].positions, ref.atoms[b].positions, atol=1e-8)
    assert np.isfinite(cpu.thermo[-1]["etot"])


def test_uncertainty_model_and_sigma_stop_in_batched_npt():
    """An ensemble (equiforce.uq) runs in the native engine, stress included, and its σ hook flags systems."""
    from equiforce.uq.ensemble import EnsemblePotential
    from equiforce.uq.stop import sigma_stop

    ensemble = EnsemblePotential.from_members([make_model("L1-corr3", seed=s) for s in range(3)])
    systems = [molecule("CH3CH2OH"), bulk("Cu", "fcc", a=3.6, cubic=True)]
    with pytest.warns(UserWarning, match=r"npt: systems \[0\] are not fully periodic"):  # the molecule: NVT
        loose = run_md(ensemble, [a.copy() for a in systems], ensemble="npt", steps=3, seed=0,
                       stop_when=sigma_stop(forces=1e6))
    assert loose.stopped_step.tolist() == [-1, -1]
    with pytest.warns(UserWarning, match="not fully periodic"):
        strict = run_md(ensemble, [a.copy() for a in systems], ensemble="npt", steps=3, seed=0,
                        stop_when=sigma_stop(forces=1e-9))
    assert strict.stopped_step.tolist() == [1, 1]


def test_checkpoint_continues_a_langevin_run_exactly(tmp_path):
    """A run split by a checkpoint (state, stop flags, thermostat stream) equals the run in one piece."""
    from equiforce.sim.checkpoint import load_md_checkpoint, save_md_checkpoint

    model = make_model("L1-corr3")
    atoms = [molecule("CH3CH2OH"), molecule("H2O")]

    def fresh():
        state = SimState.from_atoms(atoms)
        generator = torch.Generator().manual_seed(3)
        maxwell_boltzmann(state, 300.0, generator=generator)
        stop = lambda s, out: torch.tensor([False, True])  # noqa: E731 — the water is frozen at the first check
        md = MolecularDynamics(model, Langevin(0.5, 300.0, 0.02, generator=generator), stop_when=stop)
        return state, generator, md

    state, _, md = fresh()
    md.run(state, 10, keep_thermo=False)
    whole = state.positions.clone()

    state, generator, md = fresh()
    md.run(state, 4, keep_thermo=False)
    save_md_checkpoint(tmp_path / "md.ckpt", state, md.flags, generator, {"counts": torch.arange(3.0)}, {"k": 1})
    loaded = load_md_checkpoint(tmp_path / "md.ckpt")
    assert loaded.state.step == 4 and loaded.meta == {"k": 1} and loaded.arrays["counts"].tolist() == [0, 1, 2]
    _, generator, md = fresh()
    generator.set_state(loaded.generator_state)
    md.restore_flags(loaded.flags, loaded.state)
    assert md.frozen.tolist() == [False, True] and md.stopped_step.tolist() == [-1, 1]
    md.run(loaded.state, 6, keep_thermo=False)
    torch.testing.assert_close(loaded.state.positions, whole, rtol=0, atol=1e-12)


def test_checkpoint_that_is_not_one_is_a_clear_error(tmp_path):
    from equiforce.errors import DataError
    from equiforce.sim.checkpoint import load_md_checkpoint

    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.safetensors"):
        load_md_checkpoint(bad)


@pytest.mark.parametrize("ensemble", ["nve", "nvt", "nvt-csvr", "npt"])
def test_pressure_column_has_the_virial_in_every_ensemble(ensemble):
    """Without a barostat the step computes no stress; the logged pressure must still be kinetic + virial."""
    model = LennardJones()
    atoms = argon_fcc(2, a=5.0, rattle=0.05)
    result = run_md(model, atoms, ensemble=ensemble, temperature_K=100.0, steps=0, seed=0)
    state = SimState.from_atoms(result.atoms)
    out = MolecularDynamics(model, VelocityVerlet(1.0)).evaluate(state, compute_stress=True)
    expected = float(pressure(state, out)[0]) / units.bar
    assert abs(expected) > 1000  # a compressed crystal: the virial dominates
    assert result.thermo[0]["pressure_bar"] == pytest.approx(expected, rel=1e-9)


def test_langevin_conserves_energy_minus_its_heat():
    """E_total minus the heat the friction and noise exchanged stays constant (a check of the integration)."""
    model = LennardJones()
    result = run_md(model, argon_fcc(2, rattle=0.1, seed=2), ensemble="nvt", temperature_K=60.0, timestep_fs=4.0,
                    steps=150, friction_per_fs=0.02, seed=0, log_interval=1)
    conserved, etot = _series(result, "conserved"), _series(result, "etot")
    assert np.ptp(etot) > 10 * np.ptp(conserved)
    assert np.ptp(conserved) < 2e-3
    npt = run_md(model, argon_fcc(2, rattle=0.1, seed=2), ensemble="npt", temperature_K=60.0, steps=2, seed=0)
    assert "conserved" not in npt.thermo[0]  # the barostat's work is not tracked: no column that drifts


def test_structures_without_momenta_get_their_own_in_a_mixed_batch():
    model = make_model("L1-corr3")
    moving, still = molecule("H2O"), molecule("CH4")
    moving.set_momenta(np.random.default_rng(0).normal(0.0, 0.5, (3, 3)))
    result = run_md(model, [moving, still], ensemble="nve", temperature_K=300.0, steps=0, seed=0)
    assert result.thermo[1]["temperature"] == pytest.approx(300.0, rel=1e-9)  # drawn, as it would be alone
    p, m = moving.get_momenta(), moving.get_masses()
    given = p - m[:, None] * p.sum(0) / m.sum()
    np.testing.assert_allclose(result.atoms[0].get_momenta(), given, atol=1e-12)  # kept (centre of mass removed)


def test_the_frame_every_system_stopped_on_is_written(tmp_path):
    from equiforce.sim.io import read_system_frames

    model = LennardJones()

    def stop(state, outputs):
        return torch.full((state.n_systems,), state.step >= 55)

    result = run_md(model, argon_fcc(1, rattle=0.05), ensemble="nve", temperature_K=30.0, steps=500, seed=0,
                    stop_when=stop, log_interval=10, trajectory=tmp_path / "t.extxyz", trajectory_interval=100)
    assert result.steps == 60 and result.stopped_step.tolist() == [55]
    assert [f.info["step"] for f in read_system_frames(tmp_path / "t.extxyz", 0)] == [0, 60]


def test_fixed_atoms_do_not_move_and_are_not_counted_as_degrees_of_freedom():
    from ase.constraints import FixAtoms

    model = LennardJones()
    atoms = argon_fcc(2, rattle=0.05)
    atoms.set_constraint(FixAtoms(indices=range(8)))
    result = run_md(model, atoms, ensemble="nvt", temperature_K=80.0, steps=50, seed=0, log_interval=10)
    final = result.atoms[0]
    np.testing.assert_array_equal(final.positions[:8], atoms.positions[:8])
    assert np.abs(final.positions[8:] - atoms.positions[8:]).max() > 1e-3
    assert np.all(final.get_momenta()[:8] == 0) and isinstance(final.constraints[0], FixAtoms)
    assert result.thermo[0]["temperature"] == pytest.approx(80.0, rel=1e-9)  # 3 × 24 mobile atoms, no COM
    with pytest.raises(ValueError, match="with a barostat are not supported"):
        run_md(model, atoms, ensemble="npt", steps=1)


def test_npt_of_molecules_alone_is_refused():
    from equiforce.errors import ConfigError

    with pytest.raises(ConfigError, match="npt needs fully periodic systems"):
        run_md(make_model("L1-corr3"), [molecule("H2O"), molecule("CH4")], ensemble="npt", steps=2, seed=0)

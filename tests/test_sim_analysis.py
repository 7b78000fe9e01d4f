"""Analyses against known answers: random walk D, Arrhenius Ea, fcc and ideal-gas g(r), harmonic VDOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule

from equiforce.sim.analysis import (
    BondCriterion,
    arrhenius_fit,
    diffusion_coefficient,
    distance_histogram,
    histogram_distance,
    mean_squared_displacement,
    radial_distribution,
    vibrational_dos,
)
from equiforce.sim.analysis.spectra import CM_PER_FS
from equiforce.sim.integrators import VelocityVerlet
from equiforce.sim.io import TrajectoryWriter
from equiforce.sim.md import MolecularDynamics
from equiforce.sim.state import SimState
from tests.sim_models import Tether, single_thread  # noqa: F401

PNG = b"\x89PNG"


def test_random_walk_diffusion_coefficient(tmp_path):
    rng = np.random.default_rng(0)
    true_d, dt = 0.3, 0.02  # Å²/ps, ps
    steps = rng.normal(0.0, np.sqrt(2 * true_d * dt), (2000, 400, 3))
    positions = np.cumsum(steps, axis=0)
    result = diffusion_coefficient(positions, dt, n_blocks=6)
    expected = true_d * (1 - 1 / 400)  # drift removal takes out the mean walk of 400 walkers
    assert result.D == pytest.approx(expected, rel=0.05)
    assert 0 < result.D_err < 0.05 * true_d
    assert abs(result.D - expected) < 4 * result.D_err
    assert result.D_cm2_per_s == pytest.approx(result.D * 1e-4)
    result.plot(tmp_path / "msd.png")
    assert (tmp_path / "msd.png").read_bytes()[:4] == PNG


def test_atoms_vibrating_about_fixed_sites_are_not_called_diffusive(recwarn):
    """A solid's MSD levels off: fitting a line to it gave a confident D (with a tight error bar) for atoms that
    never hop.  The MSD's exponent over the window says so, and a warning is raised; a random walk stays silent."""
    rng = np.random.default_rng(2)
    dt = 0.01
    walk = np.cumsum(rng.normal(0.0, np.sqrt(2 * 0.3 * dt), (1000, 200, 3)), axis=0)
    assert diffusion_coefficient(walk, dt).diffusive
    assert abs(diffusion_coefficient(walk, dt).msd_exponent - 1) < 0.1
    assert not [w for w in recwarn if "not diffusing" in str(w.message)]
    sites = rng.uniform(0, 10, (1, 200, 3))
    phase = rng.uniform(0, 2 * np.pi, (1, 200, 3))
    t = np.arange(1000)[:, None, None] * dt
    vibrating = sites + 0.1 * np.sin(2 * np.pi * 6.0 * t + phase) + rng.normal(0, 0.02, (1000, 200, 3))
    with pytest.warns(UserWarning, match=r"MSD grows as t\^-?0\.\d+ .* not diffusing"):
        solid = diffusion_coefficient(vibrating, dt)
    assert not solid.diffusive and solid.msd_exponent < 0.5


def test_msd_matches_direct_average():
    rng = np.random.default_rng(1)
    positions = np.cumsum(rng.normal(size=(60, 5, 3)), axis=0)
    lag, msd = mean_squared_displacement(positions, 1.0, remove_drift=False)
    for m in (1, 7, 30):
        direct = ((positions[m:] - positions[:-m]) ** 2).sum(-1).mean()
        assert msd[m] == pytest.approx(direct, rel=1e-10)
    assert msd[0] == pytest.approx(0.0, abs=1e-9)


def test_arrhenius_fit_recovers_activation_energy(tmp_path):
    temperatures = np.array([600.0, 700.0, 800.0, 900.0, 1000.0])
    ea, d0 = 0.45, 30.0
    rng = np.random.default_rng(2)
    d = d0 * np.exp(-ea / (units.kB * temperatures)) * (1 + 0.02 * rng.normal(size=5))
    fit = arrhenius_fit(temperatures, d, D_err=0.02 * d)
    assert fit.Ea == pytest.approx(ea, abs=3 * fit.Ea_err + 0.005)
    assert fit.Ea_err < 0.03
    assert fit.D0 == pytest.approx(d0, rel=0.3)
    fit.plot(tmp_path / "arrhenius.png")
    assert (tmp_path / "arrhenius.png").read_bytes()[:4] == PNG


def test_fcc_rdf_shells_and_coordination(tmp_path):
    a = 3.6
    crystal = bulk("Cu", "fcc", a=a, cubic=True).repeat(3)
    rdf = radial_distribution([crystal], r_max=4.5, n_bins=450)
    first = rdf.r[np.argmax(rdf.g)]
    assert first == pytest.approx(a / np.sqrt(2), abs=0.01)
    between = np.searchsorted(rdf.r, 0.5 * (a / np.sqrt(2) + a))
    assert rdf.coordination[between] == pytest.approx(12.0)
    second = np.searchsorted(rdf.r, 0.5 * (a + a * np.sqrt(1.5)))
    assert rdf.coordination[second] == pytest.approx(18.0)
    rdf.plot(tmp_path / "rdf.png")
    assert (tmp_path / "rdf.png").read_bytes()[:4] == PNG


def test_ideal_gas_rdf_is_one():
    rng = np.random.default_rng(3)
    frames = [Atoms("Ar200", positions=rng.uniform(0, 15, (200, 3)), cell=[15, 15, 15], pbc=True)
              for _ in range(20)]
    rdf = radial_distribution(frames, r_max=6.0, n_bins=30)
    assert np.abs(rdf.g[5:] - 1).max() < 0.12
    assert np.mean(rdf.g[5:]) == pytest.approx(1.0, abs=0.02)


def test_distance_histogram_and_its_distance():
    water = molecule("H2O")
    r, h = distance_histogram(water.positions, r_max=5.0, n_bins=100)
    assert h.sum() * (r[1] - r[0]) == pytest.approx(1.0)
    assert histogram_distance(h, h, r) == 0.0
    moved = water.positions * 1.5
    _, h2 = distance_histogram(moved, r_max=5.0, n_bins=100)
    assert histogram_distance(h, h2, r) == pytest.approx(2.0)  # disjoint supports


class _Velocities(TrajectoryWriter):
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, state, outputs, time_ps) -> None:
        self.frames.append(state.velocities.numpy().copy())


def test_vdos_peak_at_harmonic_frequency(tmp_path):
    """Atoms on springs k: the VDOS peaks at ν = sqrt(k/m)/2π."""
    k = 20.0
    atoms = Atoms("Ar8", positions=np.arange(24.0).reshape(8, 3) * 5.0)
    state = SimState.from_atoms(atoms)
    state.momenta = torch.as_tensor(np.random.default_rng(4).normal(0, 1.0, (8, 3)))
    md = MolecularDynamics(Tether(state.positions.clone(), k=k), VelocityVerlet(2.0))
    recorder = _Velocities()
    md.run(state, 1023, trajectory=recorder, trajectory_interval=1, keep_thermo=False)
    vdos = vibrational_dos(np.array(recorder.frames), 2.0, masses=state.masses.numpy(), zero_pad=8)
    omega_per_fs = np.sqrt(k / atoms.get_masses()[0]) * units.fs
    expected = omega_per_fs / (2 * np.pi) * CM_PER_FS
    assert vdos.peak_cm() == pytest.approx(expected, rel=0.01)
    assert vdos.vacf[0] == pytest.approx(1.0)
    assert vdos.frequency_thz[1] > 0
    vdos.plot(tmp_path / "vdos.png", max_cm=3 * expected)
    assert (tmp_path / "vdos.png").read_bytes()[:4] == PNG


def test_bond_criterion_flags_broken_molecule():
    ethanol = molecule("CH3CH2OH")
    criterion = BondCriterion(ethanol.numbers, ethanol.positions, threshold=0.5)
    assert criterion.pairs.shape[1] == 8  # C–C, C–O, O–H, 5 C–H
    stretched = ethanol.positions.copy()
    stretched[8] += [0.0, 0.0, 3.0]  # pull one H off
    assert criterion.deviation(ethanol.positions) == pytest.approx(0.0)
    assert criterion.deviation(stretched) > 0.5
    state = SimState.from_atoms([ethanol, Atoms(ethanol.numbers, stretched), ethanol])
    flags = criterion.stop_when()(state, {})
    assert flags.tolist() == [False, True, False]
    # reference frames of a tumbling molecule: bonds from distances, not from a blurred mean geometry
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(20):
        turned = ethanol.copy()
        turned.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        turned.positions += rng.normal(0, 3.0, 3)
        frames.append(turned.positions)
    tumbling = BondCriterion(ethanol.numbers, np.array(frames))
    np.testing.assert_array_equal(tumbling.pairs, criterion.pairs)
    np.testing.assert_allclose(tumbling.lengths, criterion.lengths, atol=1e-10)


def test_in_plane_diffusion_leaves_the_normal_direction_out():
    """A slab's in-plane D must not pick up motion along z (here three times faster)."""
    rng = np.random.default_rng(1)
    d_plane, d_normal, dt = 0.3, 2.7, 0.02
    scale = np.sqrt(2 * np.array([d_plane, d_plane, d_normal]) * dt)
    positions = np.cumsum(rng.normal(0.0, 1.0, (2000, 300, 3)) * scale, axis=0)
    in_plane = diffusion_coefficient(positions, dt, n_blocks=5, axes=(0, 1))
    assert in_plane.dimension == 2 and in_plane.D == pytest.approx(d_plane * (1 - 1 / 300), rel=0.06)
    along_z = diffusion_coefficient(positions, dt, n_blocks=5, axes=(2,))
    assert along_z.D == pytest.approx(d_normal * (1 - 1 / 300), rel=0.06)
    with pytest.raises(ValueError, match="needs the axes"):
        diffusion_coefficient(positions, dt, dimension=2)

"""An equiforce potential inside OpenMM (optional: ``pip install 'equiforce[openmm]'``, OpenMM ≥ 8.6).

OpenMM's ``PythonForce`` calls a Python function with the simulation's ``State`` at every force evaluation;
:class:`OpenMMPotential` is that function.  OpenMM then drives the model with its own integrators,
thermostats, barostats, constraints, reporters and — with ``particles`` — mixed ML/MM systems, where the
model covers a subset of the particles (a ligand, a reactive centre) and a classical force field the rest.

Units cross here: OpenMM's nm and kJ/mol against equiforce's Å and eV.  The neighbour list is equiforce's
Verlet list, reused within a skin across calls and rebuilt when positions (or the box, under a barostat) move
too far.  A model with uncertainty (:mod:`equiforce.uq`) reports its σ after every call in
:attr:`OpenMMPotential.last` (``energy_std`` in eV, ``max_forces_std`` in eV/Å), so a reporter can watch it.

OpenMM serialises a ``PythonForce`` by pickling its function; equiforce does not rely on that (a model file
is safetensors + JSON): rebuild the force from the model file instead of loading a serialised ``System``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from ase import Atoms, units

from equiforce.sim.external import StructureEvaluator

EV_IN_KJ_PER_MOL = units.eV / (units.kJ / units.mol)  # 96.485...
ANGSTROM_PER_NM = 10.0


def _openmm():
    try:
        import openmm
        import openmm.app  # noqa: F401 (Simulation, Topology, reporters)
    except ImportError as err:  # optional dependency
        raise ImportError("the OpenMM bridge needs OpenMM >= 8.6: pip install 'equiforce[openmm]'") from err
    if not hasattr(openmm, "PythonForce"):
        raise ImportError(f"OpenMM {openmm.__version__} has no PythonForce; the OpenMM bridge needs OpenMM >= 8.6")
    return openmm


class OpenMMPotential:
    """The function OpenMM calls: positions (nm) in, energy (kJ/mol) and forces (kJ/mol/nm) out.

    ``numbers`` are the atomic numbers of the particles the model covers, in OpenMM's order (of ``particles``
    when the force is restricted to a subset).  ``periodic`` uses OpenMM's box vectors (each ≥ twice the
    cutoff, as OpenMM itself requires of periodic forces' cutoffs).
    """

    def __init__(self, model_or_path: torch.nn.Module | str | os.PathLike, numbers: Sequence[int], *,
                 periodic: bool = False, device: str = "cpu", dtype: torch.dtype | None = None, skin: float = 0.5,
                 compile: bool = False) -> None:
        self.periodic = bool(periodic)
        self.structure = StructureEvaluator(model_or_path, numbers, [self.periodic] * 3, device=device, dtype=dtype,
                                            skin=skin, compile=compile)
        self.last: dict[str, float] = {}
        self._nm = _openmm().unit.nanometer  # looked up once, not in every force call

    @property
    def n_atoms(self) -> int:
        return self.structure.n_atoms

    def __call__(self, state) -> tuple[float, np.ndarray]:
        nm = self._nm
        positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(nm)) * ANGSTROM_PER_NM
        if positions.shape[0] != self.n_atoms:
            raise ValueError(f"OpenMM passed {positions.shape[0]} particles but the model covers {self.n_atoms}: "
                             "give PythonForce the same particles as numbers")
        box = None
        if self.periodic:
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(nm)) * ANGSTROM_PER_NM
        try:
            out = self.structure(positions, box)
        except FloatingPointError as err:
            raise FloatingPointError(f"OpenMM: {err}") from None
        self.last = {key: out[key] for key in ("energy", "energy_std", "max_forces_std") if key in out}
        return out["energy"] * EV_IN_KJ_PER_MOL, out["forces"] * (EV_IN_KJ_PER_MOL * ANGSTROM_PER_NM)  # -> kJ/mol/nm


def openmm_force(model_or_path: torch.nn.Module | str | os.PathLike, numbers: Sequence[int], *,
                 particles: Sequence[int] | None = None, periodic: bool = False, device: str = "cpu",
                 dtype: torch.dtype | None = None, skin: float = 0.5, compile: bool = False):
    """An ``openmm.PythonForce`` with the model's energy; add it to a ``System`` with ``system.addForce``.

    ``particles``: the indices (in the ``System``) the model covers, ``numbers`` their atomic numbers in the
    same order; default all particles.  For ML/MM, remove the classical terms inside the ML region yourself
    (as openmm-ml's ``createMixedSystem`` does).  Keep the returned force to read σ: its ``equiforce``
    attribute is the :class:`OpenMMPotential`, whose ``last`` holds the latest energy and σ (``System.getForce``
    hands back a new proxy without it).
    """
    openmm = _openmm()
    numbers = list(numbers)
    if particles is not None and len(particles) != len(numbers):
        raise ValueError(f"{len(particles)} particles but {len(numbers)} atomic numbers: give one per particle")
    potential = OpenMMPotential(model_or_path, numbers, periodic=periodic, device=device, dtype=dtype, skin=skin,
                                compile=compile)
    force = openmm.PythonForce(potential, {})
    if particles is not None:
        force.setParticles([int(i) for i in particles])
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName("equiforce")
    force.equiforce = potential  # on this proxy only: System.getForce returns a new proxy without it
    return force


class OpenMMSetup(NamedTuple):
    """What :func:`openmm_system` builds: the ``System``, the positions (nm), the model's
    :class:`OpenMMPotential` (its ``last`` holds the latest energy and σ) and a ``Topology`` (one residue,
    elements and box set) for ``openmm.app.Simulation`` and its PDB/DCD reporters."""

    system: Any
    positions: Any
    potential: OpenMMPotential
    topology: Any


def openmm_topology(atoms: Atoms, box_nm: np.ndarray | None = None):
    """An OpenMM ``Topology`` of ``atoms``: one chain, one residue, their elements (no bonds: the model needs
    none), and the box when given."""
    app = _openmm().app
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    for i, z in enumerate(atoms.numbers):
        element = app.Element.getByAtomicNumber(int(z))
        topology.addAtom(f"{element.symbol}{i + 1}", element, residue)
    if box_nm is not None:
        topology.setPeriodicBoxVectors([_openmm().Vec3(*row) for row in box_nm])
    return topology


def openmm_system(atoms: Atoms, model_or_path: torch.nn.Module | str | os.PathLike, *, device: str = "cpu",
                  dtype: torch.dtype | None = None, skin: float = 0.5, compile: bool = False) -> OpenMMSetup:
    """An OpenMM ``System`` for ASE ``atoms`` (masses, box when periodic) with the model as its only force,
    and the positions as an OpenMM quantity; for a pure-ML simulation (see :func:`openmm_force` for ML/MM).

    A periodic structure is rotated into the lower-triangular box OpenMM requires (``cell.standard_form``);
    the returned positions are in that frame."""
    openmm = _openmm()
    periodic = bool(atoms.pbc.any())
    if periodic and not atoms.pbc.all():
        raise ValueError("OpenMM boxes are periodic in all three directions; atoms.pbc is " f"{atoms.pbc.tolist()}")
    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    positions, box_nm = atoms.positions, None
    if periodic:  # OpenMM wants a lower-triangular box: rotate the structure into it (energies do not change)
        cell, rotation = atoms.cell.standard_form()
        positions = positions @ rotation.T
        box_nm = np.asarray(cell) / ANGSTROM_PER_NM
        try:
            system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box_nm))
        except Exception as err:  # openmm.OpenMMException: say which cell and what to do
            raise ValueError(f"OpenMM refuses the cell {np.asarray(cell).round(4).tolist()} Å ({err}); "
                             "give a reduced cell, e.g. from ase.geometry.minkowski_reduce") from err
    force = openmm_force(model_or_path, atoms.numbers, periodic=periodic, device=device, dtype=dtype, skin=skin,
                         compile=compile)
    system.addForce(force)
    return OpenMMSetup(system, openmm.unit.Quantity(positions / ANGSTROM_PER_NM, openmm.unit.nanometer),
                       force.equiforce, openmm_topology(atoms, box_nm))


class UncertaintyExceeded(RuntimeError):
    """Raised by :class:`SigmaReporter` when σ crosses its threshold: the structure is outside what the model
    knows (label it, see :mod:`equiforce.active`)."""


class SigmaReporter:
    """An OpenMM reporter for a model with uncertainty: every ``interval`` steps it writes ``step, time (ps),
    energy (eV), energy σ (eV), max force σ (eV/Å)`` to ``file`` (CSV, optional) and raises
    :class:`UncertaintyExceeded` (from ``simulation.step``) when the max force σ exceeds ``max_forces_std``
    (eV/Å) or the energy σ per atom exceeds ``max_energy_std_per_atom`` (eV) — as ``sigma_stop`` does in the
    native engine.  The report asks OpenMM for the energy, so σ belongs to the reported positions."""

    def __init__(self, potential: OpenMMPotential, interval: int = 100, file: str | os.PathLike | None = None,
                 max_forces_std: float | None = None, max_energy_std_per_atom: float | None = None) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least one step, got {interval}")
        self.potential = potential
        self.interval = int(interval)
        self.max_forces_std = max_forces_std
        self.max_energy_std_per_atom = max_energy_std_per_atom
        self.rows: list[tuple[int, float, float, float, float]] = []
        self._file = open(file, "w", encoding="utf-8") if file is not None else None  # noqa: SIM115 (closed in close)
        if self._file is not None:
            self._file.write("step,time_ps,energy_ev,energy_std_ev,max_forces_std_ev_a\n")

    def describeNextReport(self, simulation) -> dict[str, Any]:  # noqa: N802 (OpenMM's reporter API)
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": ["energy"]}

    def report(self, simulation, state) -> None:
        last = self.potential.last
        if "max_forces_std" not in last:
            raise KeyError("SigmaReporter needs a model with uncertainty (an ensemble or uncertainty heads)")
        time_ps = state.getTime().value_in_unit(_openmm().unit.picosecond)
        row = (int(simulation.currentStep), float(time_ps), last["energy"], last.get("energy_std", float("nan")),
               last["max_forces_std"])
        self.rows.append(row)
        if self._file is not None:
            self._file.write(",".join(f"{v:.8g}" if isinstance(v, float) else str(v) for v in row) + "\n")
            self._file.flush()
        n_atoms = self.potential.n_atoms
        if self.max_forces_std is not None and row[4] > self.max_forces_std:
            raise UncertaintyExceeded(f"step {row[0]} ({time_ps:.4f} ps): max force σ {row[4]:.4g} eV/Å "
                                      f"> {self.max_forces_std} eV/Å")
        if self.max_energy_std_per_atom is not None and row[3] / n_atoms > self.max_energy_std_per_atom:
            raise UncertaintyExceeded(f"step {row[0]} ({time_ps:.4f} ps): energy σ per atom "
                                      f"{row[3] / n_atoms:.4g} eV > {self.max_energy_std_per_atom} eV")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# terms of these classical forces are switched off inside the ML region (all their atoms in it): how many terms,
# how to read and write one, and how many of its parameters are particles (the force constant comes last)
_BONDED_TERMS = {
    "HarmonicBondForce": ("getNumBonds", "getBondParameters", "setBondParameters", 2),
    "HarmonicAngleForce": ("getNumAngles", "getAngleParameters", "setAngleParameters", 3),
    "PeriodicTorsionForce": ("getNumTorsions", "getTorsionParameters", "setTorsionParameters", 4),
}
# forces that act on every particle without pair terms of their own: left as they are
_PASS_THROUGH = {"CMMotionRemover", "MonteCarloBarostat", "MonteCarloAnisotropicBarostat",
                 "MonteCarloFlexibleBarostat", "AndersenThermostat"}


def openmm_mixed_system(system, ml_particles: Sequence[int], numbers: Sequence[int],
                        model_or_path: torch.nn.Module | str | os.PathLike, *, keep: Sequence[str] = (),
                        device: str = "cpu", dtype: torch.dtype | None = None, skin: float = 0.5,
                        compile: bool = False):
    """An ML/MM copy of a classical OpenMM ``System``: inside the ML region (``ml_particles``, atomic numbers
    ``numbers``) the model replaces the force field; between the region and the rest the force field stays.

    In the copy, harmonic bonds, harmonic angles and periodic torsions whose atoms all lie in the region get a
    zero force constant, and every pair of region atoms becomes a ``NonbondedForce`` exception with no charge
    product and no LJ well (electrostatics and LJ between the region and its environment are kept: mechanical
    embedding, as openmm-ml's ``createMixedSystem``).  Any other force is refused with its name rather than
    double-counting the region silently — unless its class name is in ``keep`` (say, a restraint on the
    environment only).  Returns ``(system, potential)``.
    """
    openmm = _openmm()
    region = [int(i) for i in ml_particles]
    inside = set(region)
    if len(inside) != len(region):
        raise ValueError("ml_particles lists a particle twice")
    if any(i < 0 or i >= system.getNumParticles() for i in region):
        raise ValueError(f"ml_particles must lie in 0..{system.getNumParticles() - 1}")
    mixed = openmm.XmlSerializer.clone(system)
    for index in range(mixed.getNumForces()):
        force = mixed.getForce(index)
        kind = type(force).__name__
        if kind in _BONDED_TERMS:
            count, get, put, n_particles = _BONDED_TERMS[kind]
            for term in range(getattr(force, count)()):
                params = list(getattr(force, get)(term))
                if set(params[:n_particles]) <= inside:
                    params[-1] = 0.0 * params[-1]  # the force constant, zeroed with its unit
                    getattr(force, put)(term, *params)
        elif kind == "NonbondedForce":
            for a, i in enumerate(region):
                for j in region[a + 1:]:
                    force.addException(i, j, 0.0, 1.0, 0.0, replace=True)
        elif kind not in _PASS_THROUGH and kind not in keep:
            raise ValueError(f"the system has a {kind}, which openmm_mixed_system cannot split into ML and MM "
                             f"parts; remove its terms inside the region yourself, or pass keep=['{kind}'] if it "
                             "does not act on the region")
    force = openmm_force(model_or_path, numbers, particles=region, periodic=mixed.usesPeriodicBoundaryConditions(),
                         device=device, dtype=dtype, skin=skin, compile=compile)
    mixed.addForce(force)
    return mixed, force.equiforce

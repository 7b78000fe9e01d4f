"""Time integrators for a batched state: NVE, Langevin and CSVR thermostats, stochastic cell rescaling.

Each integrator advances every system of a :class:`SimState` by one step in place and returns the model
outputs at the new positions (the forces for the next step).  Temperatures, frictions and pressures may be
per system (tensors of shape ``[B]``).  Units are ASE's; the constructors take fs, K and bar.

* :class:`VelocityVerlet` — NVE, symplectic and time reversible.
* :class:`Langevin` — NVT by the BAOAB splitting (Leimkuhler & Matthews 2013): exact Ornstein–Uhlenbeck
  step between two half drifts, accurate configurational sampling at large time steps; it tracks the heat
  its friction and noise exchange, so ``E_total − heat`` is conserved too.
* :class:`CSVR` — NVT by canonical stochastic velocity rescaling (Bussi, Donadio & Parrinello 2007); a
  global thermostat that leaves dynamics nearly undisturbed and tracks the heat it exchanges, so
  ``E_total − heat`` is conserved (a check of the integration).
* :class:`StochasticCellRescaling` — NPT, isotropic stochastic cell rescaling (Bernetti & Bussi 2020)
  on top of CSVR: first-order barostat with correct volume fluctuations.  It has no ``conserved`` column
  (the barostat's work is not tracked).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from ase import units

from equiforce.data import keys as K
from equiforce.errors import ConfigError
from equiforce.sim.state import KB, SimState

Outputs = dict[str, torch.Tensor]
Evaluate = Callable[..., Outputs]


def _per_system(value: float | torch.Tensor, state: SimState) -> torch.Tensor:
    return torch.as_tensor(value, dtype=state.dtype, device=state.device).expand(state.n_systems).clone()


def _setting(value: float | torch.Tensor, state: SimState) -> torch.Tensor:
    """A per-system setting as a ``[B]`` device tensor — the same object when it already is one, so that a
    captured step (which reads it by address) stays valid across runs."""
    if (isinstance(value, torch.Tensor) and value.shape == (state.n_systems,) and value.dtype == state.dtype
            and value.device == state.device):
        return value
    return _per_system(value, state)


class Integrator:
    """Base: the time step in ASE units and whether forces need the stress too.

    ``carried`` names the tensor attributes a step reads and replaces (e.g. CSVR's ``heat``): a step captured
    as a CUDA graph (:mod:`equiforce.sim.graphed`) keeps them in static buffers.  :meth:`prepare` turns
    scalar settings into device tensors once, so that a step creates no tensor from host values.
    """

    needs_stress = False
    carried: tuple[str, ...] = ()
    tracks_conserved = True  # whether E_total + conserved_correction() is a constant of the dynamics

    def __init__(self, timestep_fs: float) -> None:
        if timestep_fs <= 0:
            raise ConfigError("timestep must be positive")
        self.dt = float(timestep_fs) * units.fs

    def kick(self, state: SimState, outputs: Outputs, fraction: float) -> None:
        state.momenta = state.momenta + (fraction * self.dt) * state.without_fixed(outputs[K.FORCES])

    def drift(self, state: SimState, fraction: float) -> None:
        state.positions = state.positions + (fraction * self.dt) * state.velocities

    def evaluate(self, state: SimState, evaluate: Evaluate) -> Outputs:
        return evaluate(state, compute_stress=self.needs_stress, dt=self.dt)

    def step(self, state: SimState, outputs: Outputs, evaluate: Evaluate) -> Outputs:
        raise NotImplementedError

    def prepare(self, state: SimState) -> None:
        """Per-system settings as ``[B]`` tensors on the state's device (called before a step is captured)."""

    def check(self, state: SimState) -> None:
        """Refuse a state this integrator cannot advance correctly (called before a run)."""

    def conserved_correction(self) -> torch.Tensor | float:
        """[B] energy the thermostat/barostat has taken out (add to the total energy to get a constant)."""
        return 0.0


class VelocityVerlet(Integrator):
    """NVE: kick–drift–kick."""

    def step(self, state: SimState, outputs: Outputs, evaluate: Evaluate) -> Outputs:
        self.kick(state, outputs, 0.5)
        self.drift(state, 1.0)
        outputs = self.evaluate(state, evaluate)
        self.kick(state, outputs, 0.5)
        return outputs


class Langevin(Integrator):
    """NVT by BAOAB.  ``friction_per_fs`` γ (e.g. 0.01 fs⁻¹ = 1/(100 fs)); per-system ``temperature_K``."""

    carried = ("heat",)

    def __init__(self, timestep_fs: float, temperature_K: float | torch.Tensor, friction_per_fs: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(timestep_fs)
        self.temperature_K, self.friction = temperature_K, float(friction_per_fs) / units.fs
        self.generator = generator
        self.heat: torch.Tensor | None = None  # [B] kinetic energy the O step took out (the bath's share)

    def prepare(self, state: SimState) -> None:
        self.temperature_K = _setting(self.temperature_K, state)
        if self.heat is None:
            self.heat = torch.zeros(state.n_systems, dtype=state.dtype, device=state.device)

    def step(self, state: SimState, outputs: Outputs, evaluate: Evaluate) -> Outputs:
        if self.heat is None:
            self.heat = torch.zeros(state.n_systems, dtype=state.dtype, device=state.device)
        self.kick(state, outputs, 0.5)
        self.drift(state, 0.5)
        c1 = math.exp(-self.friction * self.dt)
        kt = KB * _per_system(self.temperature_K, state)[state.system]
        noise = torch.randn(state.momenta.shape, generator=self.generator, dtype=state.dtype, device=state.device)
        before = state.momenta
        kick = torch.sqrt((1 - c1 * c1) * state.masses * kt)[:, None] * noise
        state.momenta = c1 * before + state.without_fixed(kick)
        # the kinetic energy the O step took out, per atom, summed per system once
        self.heat = self.heat + state.per_system(0.5 * (before * before - state.momenta * state.momenta).sum(-1)
                                                 / state.masses)
        self.drift(state, 0.5)
        outputs = self.evaluate(state, evaluate)
        self.kick(state, outputs, 0.5)
        return outputs

    def conserved_correction(self) -> torch.Tensor | float:
        return self.heat if self.heat is not None else 0.0


def _sum_of_squared_normals(state: SimState, count: torch.Tensor,
                            generator: torch.Generator | None) -> torch.Tensor:
    """[B] Σ_{k<count_b} R_k² with R standard normal (a χ² draw per system, exact, on the device)."""
    noise = torch.randn(state.momenta.shape, generator=generator, dtype=state.dtype, device=state.device)
    local = (torch.arange(state.positions.shape[0], device=state.device) - state.ptr[state.system])
    index = 3 * local[:, None] + torch.arange(3, device=state.device)
    use = index < count[state.system, None]
    return state.per_system(torch.where(use, noise * noise, torch.zeros_like(noise)).sum(-1))


class CSVR(Integrator):
    """NVT by stochastic velocity rescaling, applied for half a step before and after velocity Verlet.

    ``tau_fs`` is the thermostat's relaxation time (≈ 100 fs is gentle; very small values approach
    simple velocity rescaling).  ``heat`` [B] accumulates the kinetic energy the thermostat removed.
    """

    def __init__(self, timestep_fs: float, temperature_K: float | torch.Tensor, tau_fs: float = 100.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(timestep_fs)
        self.temperature_K, self.tau = temperature_K, float(tau_fs) * units.fs
        self.generator = generator
        self.heat: torch.Tensor | None = None

    carried = ("heat",)

    def prepare(self, state: SimState) -> None:
        self.temperature_K = _setting(self.temperature_K, state)
        if self.heat is None:
            self.heat = torch.zeros(state.n_systems, dtype=state.dtype, device=state.device)

    def thermostat(self, state: SimState, fraction: float) -> None:
        dof = state.dof
        kinetic = state.kinetic_energy()
        target = 0.5 * dof * KB * _per_system(self.temperature_K, state)
        c = math.exp(-fraction * self.dt / self.tau)
        r1 = torch.randn(state.n_systems, generator=self.generator, dtype=state.dtype, device=state.device)
        rest = _sum_of_squared_normals(state, (dof - 1).round().long(), self.generator)
        ratio = target / (dof * kinetic.clamp_min(1e-300))
        new_kinetic = kinetic + (1 - c) * (target * (r1 * r1 + rest) / dof - kinetic) \
            + 2 * r1 * torch.sqrt(c * (1 - c) * kinetic * target / dof)
        alpha2 = new_kinetic / kinetic.clamp_min(1e-300)
        sign = torch.sign(r1 + torch.sqrt(c / ((1 - c) * ratio.clamp_min(1e-300))))
        alpha = torch.where(kinetic > 0, sign * torch.sqrt(alpha2.clamp_min(0)), torch.ones_like(kinetic))
        state.momenta = state.momenta * alpha[state.system, None]
        self.heat = self.heat + (kinetic - new_kinetic.where(kinetic > 0, kinetic))

    def step(self, state: SimState, outputs: Outputs, evaluate: Evaluate) -> Outputs:
        if self.heat is None:
            self.heat = torch.zeros(state.n_systems, dtype=state.dtype, device=state.device)
        self.thermostat(state, 0.5)
        self.kick(state, outputs, 0.5)
        self.drift(state, 1.0)
        outputs = self.before_forces(state, outputs)
        outputs = self.evaluate(state, evaluate)
        self.kick(state, outputs, 0.5)
        self.thermostat(state, 0.5)
        return outputs

    def before_forces(self, state: SimState, outputs: Outputs) -> Outputs:
        return outputs

    def conserved_correction(self) -> torch.Tensor | float:
        return self.heat if self.heat is not None else 0.0


def pressure(state: SimState, outputs: Outputs) -> torch.Tensor:
    """[B] instantaneous pressure (kinetic + virial) in eV/Å³; zero for non-periodic systems."""
    volume = state.volume()
    safe = torch.where(volume > 0, volume, torch.ones_like(volume))
    kinetic = 2.0 * state.kinetic_energy()
    virial = torch.diagonal(outputs[K.VIRIAL], dim1=1, dim2=2).sum(-1) if K.VIRIAL in outputs else 0.0
    return torch.where(volume > 0, (kinetic + virial) / (3.0 * safe), torch.zeros_like(volume))


class StochasticCellRescaling(CSVR):
    """NPT: isotropic stochastic cell rescaling (Bernetti & Bussi 2020) with a CSVR thermostat.

    ``dε = −(β/τ_p)(P₀ − P − kT/V) dt + sqrt(2 kT β/(V τ_p)) dW`` with ``ε = ln V``; positions and cell are
    scaled by ``exp(dε/3)``, momenta by its inverse.  ``compressibility_per_bar`` β only sets the time scale
    (water 4.5e-5, metals ≈ 1e-6); ``tau_p_fs`` ≈ 1000 fs.  Non-periodic systems are left at constant volume.
    """

    needs_stress = True
    tracks_conserved = False

    def __init__(self, timestep_fs: float, temperature_K: float | torch.Tensor,
                 pressure_bar: float | torch.Tensor = 1.0, tau_fs: float = 100.0, tau_p_fs: float = 1000.0,
                 compressibility_per_bar: float = 4.5e-5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(timestep_fs, temperature_K, tau_fs, generator)
        self.pressure_bar = pressure_bar
        self.tau_p = float(tau_p_fs) * units.fs
        self.beta = float(compressibility_per_bar) / units.bar  # Å³/eV

    def prepare(self, state: SimState) -> None:
        super().prepare(state)
        self.pressure_bar = _setting(self.pressure_bar, state)

    def check(self, state: SimState) -> None:
        periodic = state.periodic
        if not bool(periodic.any()):
            raise ConfigError("npt needs fully periodic systems with a cell (pbc all True): none of these is, and a "
                              "barostat has no volume to act on; run nvt-csvr for molecules")
        if not bool(periodic.all()):
            warnings.warn(f"npt: systems {torch.nonzero(~periodic).flatten().tolist()} are not fully periodic; they "
                          "run at constant volume with the thermostat only", stacklevel=3)
        if state.fixed is not None:
            raise ConfigError("fixed atoms (FixAtoms) with a barostat are not supported: scaling the cell would "
                              "move them; run NVT, or relax the cell without the constraint")

    def before_forces(self, state: SimState, outputs: Outputs) -> Outputs:
        volume = state.volume()
        periodic = volume > 0
        safe = torch.where(periodic, volume, torch.ones_like(volume))
        kt = KB * _per_system(self.temperature_K, state)
        target = _per_system(self.pressure_bar, state) * units.bar
        current = pressure(state, outputs)
        noise = torch.randn(state.n_systems, generator=self.generator, dtype=state.dtype, device=state.device)
        d_eps = -(self.beta / self.tau_p) * (target - current - kt / safe) * self.dt \
            + torch.sqrt(2 * kt * self.beta * self.dt / (safe * self.tau_p)) * noise
        d_eps = torch.where(periodic, d_eps, torch.zeros_like(d_eps))
        mu = torch.exp(d_eps / 3.0)
        state.positions = state.positions * mu[state.system, None]
        state.cell = state.cell * mu[:, None, None]
        state.momenta = state.momenta / mu[state.system, None]
        return outputs

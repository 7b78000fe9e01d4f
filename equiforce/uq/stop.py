"""Stop or flag MD trajectories whose uncertainty crosses a threshold.

:func:`sigma_stop` returns a ``stop_when(state, outputs) -> bool [B]`` for
:class:`equiforce.sim.md.MolecularDynamics` / :func:`equiforce.sim.md.run_md`: a system is flagged when
the largest per-atom force σ in it (DeePMD's max model deviation, with calibrated σ) exceeds the
threshold, or when its energy σ per atom does.  Pure tensor ops: no host sync per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from equiforce.data import keys as K
from equiforce.uq import keys as UK


def per_system_max(values: torch.Tensor, system: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Max of per-atom ``values [N]`` within each system ``[B]``."""
    out = torch.full((n_systems,), -torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, system, values, reduce="amax", include_self=True)


def sigma_stop(forces: float | None = None, energy_per_atom: float | None = None
               ) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """A stop hook flagging systems with max force σ > ``forces`` (eV/Å) or energy σ / atom > ``energy_per_atom`` (eV).

    Needs a model with uncertainty (its outputs carry ``forces_std`` / ``energy_std``); with a plain
    potential it raises on the first step rather than never stopping.  σ = inf (an element never seen
    in training) always stops.
    """
    if forces is None and energy_per_atom is None:
        raise ValueError("give a force σ threshold (eV/Å), an energy σ per atom threshold (eV), or both")

    def stop_when(state: Any, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        n_systems = int(state.cell.shape[0])
        flag = torch.zeros(n_systems, dtype=torch.bool, device=state.positions.device)
        if forces is not None:
            if UK.FORCES_STD not in outputs:
                raise KeyError("sigma_stop needs a model with uncertainty: its outputs carry no 'forces_std'")
            flag = flag | (per_system_max(outputs[UK.FORCES_STD], state.system, n_systems) > forces)
        if energy_per_atom is not None:
            if UK.ENERGY_STD not in outputs:
                raise KeyError("sigma_stop needs a model with uncertainty: its outputs carry no 'energy_std'")
            n_atoms = state.n_atoms.to(outputs[UK.ENERGY_STD].dtype)  # not bincount: it syncs with the host
            flag = flag | (outputs[UK.ENERGY_STD] / n_atoms > energy_per_atom)
        return flag

    return stop_when


def max_force_sigma(outputs: dict[str, torch.Tensor], graph: dict[str, torch.Tensor]) -> torch.Tensor:
    """Largest per-atom force σ of each structure of a graph (for selection in active learning)."""
    batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
    return per_system_max(outputs[UK.FORCES_STD], batch, graph[K.CELL].shape[0])

"""Analytic Hessians (second derivatives of the energy) by autograd, and normal-mode frequencies."""

from __future__ import annotations

import os

import numpy as np
import torch
from ase import units

from equiforce.data import keys as K
from equiforce.models.file import load_for_inference
from equiforce.models.potential import Potential
from equiforce.sim.calculator import inference_graph


def hessian(model: Potential | str | os.PathLike, atoms, device: str = "cpu") -> np.ndarray:
    """``∂²E/∂r_a∂r_b`` as a ``[3N, 3N]`` array in eV/Å², exact (autograd through the forces).

    ``model``: a model or a model file.  An ensemble's Hessian is the mean of its members' (its energy is their
    mean); a model with uncertainty heads has its backbone's.  The caller's model is not moved (a copy goes to
    another ``device``).
    """
    from equiforce.uq.ensemble import EnsemblePotential

    model = load_for_inference(model, device=device)
    model.check_elements(atoms.numbers)
    if isinstance(model, EnsemblePotential):  # its batched pass detaches positions: one member at a time
        return np.mean([hessian(model.member(m), atoms, device) for m in range(model.n_members)], axis=0)
    dtype = next(model.parameters()).dtype
    graph = inference_graph(atoms, model.cutoff, device, dtype)
    positions = graph[K.POSITIONS].detach().requires_grad_(True)
    graph = {**graph, K.POSITIONS: positions}
    forces = model(graph, compute_forces=True, create_graph=True)[K.FORCES].reshape(-1)
    rows = []
    for k in range(forces.shape[0]):
        (grad,) = torch.autograd.grad(-forces[k], positions, retain_graph=True, allow_unused=False)
        rows.append(grad.reshape(-1))
    h = torch.stack(rows).detach().cpu().double().numpy()
    return 0.5 * (h + h.T)


def frequencies_from_hessian(h: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Harmonic frequencies in cm⁻¹ of a ``[3N, 3N]`` Hessian (eV/Å²) and masses (amu), ascending; imaginary
    modes as negative numbers."""
    m = np.repeat(np.asarray(masses, dtype=np.float64), 3)
    eigenvalues = np.linalg.eigvalsh(h / np.sqrt(np.outer(m, m)))  # eV / (Å² amu)
    # ω = sqrt(λ) in units of sqrt(eV/(Å² amu)); convert to cm⁻¹
    to_cm = 1e10 * np.sqrt(units._e / units._amu) / (2 * np.pi * units._c * 100)
    return np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * to_cm


def vibrational_frequencies(model: Potential | str | os.PathLike, atoms, device: str = "cpu") -> np.ndarray:
    """Harmonic frequencies in cm⁻¹ from the mass-weighted Hessian (imaginary modes as negative); ``model``: a
    model or a model file."""
    return frequencies_from_hessian(hessian(model, atoms, device), atoms.get_masses())

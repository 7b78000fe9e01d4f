"""Exploration: where might the current model be wrong?  Batched MD replicas, random distortions and turns.

All replicas of a round (temperature ladder × replicas) advance together in one state of the native
batched engine, one model call per step.  A replica whose largest atomic force σ crosses the threshold
is frozen (``sigma_stop``): its last frame is exactly where the model stopped knowing, and MD past it
would only wander into geometries the oracle cannot use.  Snapshots every ``sample_every`` steps and
randomly displaced / strained copies and copies with a rotatable bond turned (molecules) are the
candidates; one batched pass of the uncertainty model then
gives each its σ, its descriptors (for diversity) and its predicted forces (to rate σ after labelling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms

from equiforce.active.config import ExploreConfig
from equiforce.active.select import Candidates
from equiforce.active.torsions import random_conformer
from equiforce.data import keys as K
from equiforce.data.graph import collate, config_to_graph, edge_vectors
from equiforce.data.structure import Configuration
from equiforce.sim.analysis.structure import BondCriterion
from equiforce.sim.md import MolecularDynamics, make_integrator
from equiforce.sim.state import SimState, maxwell_boltzmann
from equiforce.uq.stop import max_force_sigma, sigma_stop


@dataclass
class Exploration:
    """The candidates of one round and what the MD did."""

    structures: list[Atoms]
    sources: list[str]
    candidates: Candidates
    predicted_forces: list[np.ndarray]
    md: dict[str, Any] = field(default_factory=dict)


MD_SOURCE = "md:"  # prefix of the source (and config_type) of a candidate that is an MD snapshot


def from_md(source: str) -> bool:
    """Whether a candidate (or a label made from one) is a plain MD snapshot, not a distorted copy."""
    return str(source).startswith(MD_SOURCE)


TORSION_SOURCE = "torsion"  # prefix of a structure made by turning rotatable bonds (see equiforce.active.torsions)


def md_seed(source: str) -> bool:
    """Whether a labelled structure may start exploration MD: an MD snapshot or a turned conformer (bond
    lengths and angles intact), not a distorted copy whose strain MD would only add to."""
    return from_md(source) or str(source).startswith(TORSION_SOURCE)


def exploration_seeds(starts: Sequence[Atoms], labelled: Sequence[Configuration], restart_from: str) -> list[Atoms]:
    """Where this round's MD replicas and distortions start (``explore.restart_from``): the starting structures
    plus the labelled ones the setting admits, told apart by the source each label keeps in ``config_type``."""
    admits = {"start": lambda source: False, "labelled": lambda source: True, "labelled_md": md_seed,
              "labelled_md_snapshots": from_md}
    if restart_from not in admits:
        raise ValueError(f"explore.restart_from: unknown setting {restart_from!r} (one of {sorted(admits)})")
    return list(starts) + [c.to_atoms() for c in labelled if admits[restart_from](c.config_type)]


def distort(atoms: Atoms, amplitude: float, strain: float, rng: np.random.Generator) -> Atoms:
    """A copy with Gaussian displacements (σ = ``amplitude`` Å) and, for periodic cells, a random strain."""
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if strain > 0 and out.pbc.any():
        eps = rng.uniform(-strain, strain, (3, 3))
        eps = 0.5 * (eps + eps.T)
        out.set_cell(np.asarray(out.cell) @ (np.eye(3) + eps), scale_atoms=True)
    out.positions = out.positions + rng.normal(0.0, amplitude, out.positions.shape)
    return out


def _md(model: torch.nn.Module, seeds: Sequence[Atoms], cfg: ExploreConfig, threshold: float, rng: np.random.Generator,
        device: torch.device, bonds: BondCriterion | None) -> tuple[list[Atoms], list[str], dict[str, Any]]:
    systems, temperatures = [], []
    for temperature in cfg.temperatures:
        for _ in range(cfg.replicas):
            start = seeds[int(rng.integers(len(seeds)))]
            systems.append(Atoms(numbers=start.numbers, positions=start.positions, cell=start.cell, pbc=start.pbc))
            temperatures.append(temperature)
    dtype = next(model.parameters()).dtype
    state = SimState.from_atoms(systems, device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(1 << 62)))
    temps = torch.tensor(temperatures, dtype=dtype, device=device)
    maxwell_boltzmann(state, temps, generator=generator, remove_com=False)
    integrator = make_integrator("nvt", cfg.timestep_fs, temps, friction_per_fs=cfg.friction_per_fs,
                                 generator=generator)
    uncertain = sigma_stop(forces=threshold)
    broken = bonds.stop_when() if bonds is not None else None

    def stop_when(state: SimState, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        flag = uncertain(state, outputs)
        return flag | broken(state, outputs) if broken is not None else flag

    md = MolecularDynamics(model, integrator, stop_when=stop_when, stop_mode="freeze")
    frames: list[Atoms] = []
    sources: list[str] = []
    was_frozen = np.zeros(len(systems), dtype=bool)
    done = 0
    while done < cfg.steps:
        chunk = min(cfg.sample_every, cfg.steps - done)
        md.run(state, chunk, keep_thermo=False)
        done += chunk
        frozen = md.frozen.cpu().numpy()
        finite = (md.nonfinite_step < 0).cpu().numpy()
        current = state.to_atoms()
        for b, atoms in enumerate(current):
            if was_frozen[b] or not finite[b]:  # a frozen replica's frame was taken when it froze
                continue
            frames.append(Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc))
            sources.append(f"{MD_SOURCE}{temperatures[b]:g}K")
        was_frozen = frozen
        if frozen.all():
            break
    stopped = md.stopped_step.cpu().numpy()
    nonfinite = md.nonfinite_step.cpu().numpy()
    dt_ps = cfg.timestep_fs / 1000.0
    stats: dict[str, Any] = {"steps": done, "threshold_ev_a": threshold, "per_temperature": {}}
    for temperature in cfg.temperatures:
        mine = [b for b, t in enumerate(temperatures) if t == temperature]
        lengths = [(stopped[b] if stopped[b] >= 0 else done) * dt_ps for b in mine]
        stats["per_temperature"][f"{temperature:g}"] = {
            "replicas": len(mine), "sigma_stopped": int(sum(stopped[b] >= 0 for b in mine)),
            "nonfinite": int(sum(nonfinite[b] >= 0 for b in mine)), "mean_time_ps": float(np.mean(lengths)),
            "max_time_ps": done * dt_ps}
    stats["sigma_stopped"] = int((stopped >= 0).sum())
    return frames, sources, stats


def evaluate_candidates(model: torch.nn.Module, structures: Sequence[Atoms], batch_size: int = 32
                        ) -> tuple[Candidates, list[np.ndarray]]:
    """σ (max atomic force σ), per-element mean descriptors, closest pair and predicted forces of each structure."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    elements = list(model.spec.elements)
    sigmas, descriptors, closest, forces = [], [], [], []
    model.eval()
    for start in range(0, len(structures), batch_size):
        chunk = structures[start:start + batch_size]
        graphs = [config_to_graph(Configuration.from_atoms(a), model.cutoff, dtype) for a in chunk]
        batch = {k: v.to(device) for k, v in collate(graphs).items()}
        with torch.enable_grad():
            out = model(batch, compute_forces=True, return_features=True)
        sigmas.append(max_force_sigma(out, batch).detach().cpu().double().numpy())
        features = torch.cat([f[..., 0] for f in out[K.NODE_FEATURES]], dim=-1).detach()
        n_graphs, width = len(chunk), features.shape[-1]
        per_element = []
        for z in elements:  # the mean environment of each element: molecules of one composition stay comparable
            mask = (batch[K.NUMBERS] == z).to(features.dtype)
            total = torch.zeros(n_graphs, width, dtype=features.dtype, device=device).index_add(
                0, batch[K.BATCH], features * mask[:, None])
            count = torch.zeros(n_graphs, dtype=features.dtype, device=device).index_add(0, batch[K.BATCH], mask)
            per_element.append(total / count.clamp_min(1.0)[:, None])
        descriptors.append(torch.cat(per_element, dim=-1).cpu().double().numpy())
        centre = batch[K.EDGE_INDEX][0]
        vectors = edge_vectors(batch[K.POSITIONS], batch[K.EDGE_INDEX], batch[K.SHIFTS], batch[K.CELL], batch[K.BATCH])
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        nearest = torch.full((n_graphs,), float("inf"), dtype=lengths.dtype, device=device)
        nearest = nearest.scatter_reduce(0, batch[K.BATCH][centre], lengths, reduce="amin")
        closest.append(nearest.detach().cpu().double().numpy())
        f = out[K.FORCES].detach().cpu().double().numpy()
        ptr = np.concatenate([[0], np.cumsum([len(a) for a in chunk])])
        forces += [f[ptr[i]:ptr[i + 1]] for i in range(len(chunk))]
        del out
    if not structures:
        return Candidates(np.zeros(0), np.zeros((0, 1)), np.zeros(0)), []
    return Candidates(np.concatenate(sigmas), np.concatenate(descriptors), np.concatenate(closest)), forces


def explore(model: torch.nn.Module, seeds: Sequence[Atoms], cfg: ExploreConfig, threshold: float,
            rng: np.random.Generator, rattle_seeds: Sequence[Atoms] | None = None,
            bonds: BondCriterion | None = None) -> Exploration:
    """MD candidates from ``seeds`` and distorted copies of ``rattle_seeds`` (default ``seeds``), rated by ``model``.

    With ``bonds`` (molecules) a replica is also frozen when a bond breaks, and each candidate gets its
    largest bond-length deviation.
    """
    device = next(model.parameters()).device
    frames, sources, stats = _md(model, seeds, cfg, threshold, rng, device, bonds)
    pool = list(rattle_seeds or seeds)
    lo, hi = min(cfg.rattle_amplitude), max(cfg.rattle_amplitude)
    for _ in range(cfg.rattle):
        amplitude = float(rng.uniform(lo, hi))
        frames.append(distort(pool[int(rng.integers(len(pool)))], amplitude, cfg.strain, rng))
        sources.append(f"rattle:{amplitude:.3f}")
    for _ in range(cfg.torsions):
        turned = random_conformer(pool[int(rng.integers(len(pool)))], rng, all_bonds=False)
        if turned is not None:
            frames.append(distort(turned[0], lo, 0.0, rng))
            sources.append(f"{TORSION_SOURCE}:{turned[1][0]:.0f}")
    candidates, forces = evaluate_candidates(model, frames)
    if bonds is not None:
        candidates.bond_deviation = np.array([float(bonds.deviation(a.positions)) for a in frames])
    stats["candidates"] = len(frames)
    finite = candidates.sigma[np.isfinite(candidates.sigma)]
    stats["sigma_p95_ev_a"] = float(np.percentile(finite, 95)) if finite.size else float("nan")
    stats["sigma_median_ev_a"] = float(np.median(finite)) if finite.size else float("nan")
    return Exploration(frames, sources, candidates, forces, stats)


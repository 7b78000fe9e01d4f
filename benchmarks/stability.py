"""How long a potential stays stable in MD (Fu et al. 2023, "Forces are not enough", TMLR).

    python benchmarks/stability.py --model aspirin.eqf \
        --data ../shared/data/rmd17/rmd17_aspirin_test_01.npz --out stability.json \
        --trajectories 8 --time-ps 100 --temperature 500 --timestep-fs 0.5 --device cuda --dtype float64

``--trajectories`` K independent Langevin NVT runs, all in one batched state of the native engine, start
from K reference frames with Maxwell–Boltzmann velocities.  A trajectory fails once a bond (a pair closer
than 1.2 × the sum of covalent radii in most reference frames) deviates from its mean distance over the
reference frames by more than ``--bond-threshold`` (0.5 Å); it is then frozen and the others go on.  Reported:

* ``stable`` / ``trajectories`` and ``mean_time_to_failure_ps`` (a stable run counts its full length);
* ``hr_distance`` = ∫|h_sim(r) − h_ref(r)| dr between the interatomic-distance distributions of the stable
  parts of the runs and of the reference data (0 ≤ d ≤ 2; 500 bins over 0–10 Å as in Fu et al.);
* ``nve_drift_mev_atom_ps``: from the final NVT states, ``--nve-ps`` of NVE; the slope of a linear fit of the
  total energy, per atom, averaged over the trajectories that stayed intact (also its maximum).

Long runs survive interruption: every ``--checkpoint-ps`` of NVT the state, the stop flags, the thermostat's
random stream and the h(r) counts go atomically to ``OUT.checkpoint.safetensors`` (``--checkpoint``), and
``--resume`` continues from there with the same trajectories (settings and model checked against the
checkpoint; only ``--time-ps`` may change).  ``--stop-after-ps`` / ``--max-wall-min`` end an invocation early
with a checkpoint (a job's time limit) and the progress so far in ``OUT.partial.json`` (``"complete": false``,
``nvt_ps_done``, the trajectories intact so far and the h(r) distance of the part run); the NVE part restarts
from the end of NVT if interrupted.  The finished result has ``"complete": true``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equiforce.data.io import read_configurations  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.sim.analysis.structure import BondCriterion, distance_histogram, histogram_distance  # noqa: E402
from equiforce.sim.checkpoint import MDCheckpoint, load_md_checkpoint, save_md_checkpoint  # noqa: E402
from equiforce.sim.integrators import Langevin, VelocityVerlet  # noqa: E402
from equiforce.sim.md import MolecularDynamics  # noqa: E402
from equiforce.sim.resumable import check_settings, restore  # noqa: E402
from equiforce.sim.state import SimState, maxwell_boltzmann  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.cli_types import positive_float, positive_int  # noqa: E402
from equiforce.utils.digest import file_sha256  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

R_MAX, N_BINS = 10.0, 500


def _progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    return bar, bar.add_task(label, total=total)


def run_nvt(model, state: SimState, criterion: BondCriterion, args: argparse.Namespace,
            generator: torch.Generator, counts: np.ndarray, resumed: MDCheckpoint | None = None,
            checkpoint=None) -> tuple[MolecularDynamics, np.ndarray, bool]:
    """Batched NVT until every trajectory failed or the time is up; h(r) counts of the intact parts.

    Continues from ``state.step`` (a resumed run) with ``counts``, flags and random stream from ``resumed``;
    ``checkpoint(md, counts)`` is called every ``--checkpoint-ps``.  Returns whether the NVT part finished
    (False: stopped early by ``--stop-after-ps`` / ``--max-wall-min``, to be resumed)."""
    integrator = Langevin(args.timestep_fs, args.temperature, args.friction_per_fs, generator=generator)
    md = MolecularDynamics(model, integrator, skin=args.skin, stop_when=criterion.stop_when(),
                           stop_check_interval=args.check_every, cuda_graph=args.cuda_graph,
                           compile=args.compile)
    if resumed is not None:
        restore(md, resumed)
    steps = int(round(args.time_ps * 1000 / args.timestep_fs))
    sample = max(1, int(round(args.sample_fs / args.timestep_fs)))
    # checkpoints and early stops fall on h(r) samples, so a resumed run samples exactly where one run would
    every = sample * max(1, int(round(args.checkpoint_ps * 1000 / args.timestep_fs / sample)))
    halt = steps
    if args.stop_after_ps is not None:
        halt = min(steps, sample * math.ceil(args.stop_after_ps * 1000 / args.timestep_fs / sample))
    deadline = None if args.max_wall_min is None else time.perf_counter() + 60.0 * args.max_wall_min
    bar, task = _progress(steps, "NVT")
    with bar:
        done = state.step
        bar.update(task, completed=done)
        while done < halt:
            chunk = min(sample, steps - done)
            md.run(state, chunk, keep_thermo=False, log_interval=10**9, trajectory_interval=10**9)
            done += chunk
            intact = ~md.frozen
            if bool(intact.any()):
                positions = state.positions.detach().reshape(state.n_systems, -1, 3)[intact].cpu().double().numpy()
                counts += distance_histogram(positions, R_MAX, N_BINS)[1] * len(positions)
            bar.update(task, completed=done)
            if not bool(intact.any()):
                break
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if checkpoint is not None and (done % every == 0 or done >= halt or out_of_time) and done < steps:
                checkpoint(md, counts)
            if out_of_time:
                break
    finished = done >= steps or not bool((~md.frozen).any())
    return md, counts, finished


def run_nve(model, state: SimState, args: argparse.Namespace, criterion: BondCriterion) -> dict[str, Any]:
    """NVE from the given state; drift = |slope of E_total(t)| per atom, over trajectories that stay intact."""
    md = MolecularDynamics(model, VelocityVerlet(args.timestep_fs), skin=args.skin, stop_when=criterion.stop_when(),
                           stop_check_interval=args.check_every, cuda_graph=args.cuda_graph,
                           compile=args.compile)
    steps = int(round(args.nve_ps * 1000 / args.timestep_fs))
    every = max(1, steps // 200)
    result = md.run(state, steps, log_interval=every, trajectory_interval=10**9)
    drifts = []
    n_atoms = state.n_atoms.tolist()
    for b in range(state.n_systems):
        if md.frozen[b]:
            continue
        rows = [r for r in result.thermo if r["system"] == b]
        t = np.array([r["time_ps"] for r in rows])
        e = np.array([r["etot"] for r in rows])
        slope = np.polyfit(t - t[0], e, 1)[0] if len(t) > 2 else float("nan")
        drifts.append(abs(slope) / n_atoms[b] * 1000.0)
    return {"nve_drift_mev_atom_ps": float(np.mean(drifts)) if drifts else None,
            "nve_drift_max_mev_atom_ps": float(np.max(drifts)) if drifts else None,
            "nve_trajectories": len(drifts), "nve_ps": args.nve_ps}


def nvt_summary(md: MolecularDynamics, counts: np.ndarray, r: np.ndarray, h_ref: np.ndarray, time_ps: float,
                timestep_fs: float) -> dict[str, Any]:
    """Stable count, times to failure (an intact trajectory counts ``time_ps``) and h(r) distance so far."""
    dt_ps = timestep_fs / 1000.0
    stopped = md.stopped_step.cpu().numpy()
    nonfinite = md.nonfinite_step.cpu().numpy()
    failed_at = np.where(stopped >= 0, stopped, np.where(nonfinite >= 0, nonfinite, -1))
    times = np.where(failed_at >= 0, failed_at * dt_ps, time_ps)
    # counts hold each sample's density weighted by its frame count: normalise back to ∫ h dr = 1
    h_sim = counts / (counts.sum() * (r[1] - r[0])) if counts.sum() > 0 else None
    return {"stable": int((failed_at < 0).sum()), "mean_time_to_failure_ps": float(times.mean()),
            "time_to_failure_ps": times.tolist(),
            "hr_distance": histogram_distance(h_sim, h_ref, r) if h_sim is not None else None}


def run_record(args: argparse.Namespace, wall_time_s: float) -> dict[str, Any]:
    """What every result file of a run says about it, finished (``OUT``) or not (``OUT.partial.json``)."""
    return {"benchmark": "stability", "model": str(args.model), "data": str(args.data),
            "trajectories": args.trajectories, "time_ps": args.time_ps, "temperature_K": args.temperature,
            "timestep_fs": args.timestep_fs, "device": args.device, "dtype": args.dtype, "compile": args.compile,
            "wall_time_s": wall_time_s, "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
            "seed": args.seed}


RUN_DEFINING = ("data", "trajectories", "temperature", "timestep_fs", "friction_per_fs", "bond_threshold",
                "sample_fs", "check_every", "skin", "max_reference", "seed", "dtype")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (the model by content)."""
    return {"model_sha256": file_sha256(args.model), **{key: getattr(args, key) for key in RUN_DEFINING}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="reference frames (rMD17 npz, extxyz, ...)")
    parser.add_argument("--out", default="stability.json")
    parser.add_argument("--trajectories", type=positive_int, default=8)
    parser.add_argument("--time-ps", type=positive_float, default=100.0)
    parser.add_argument("--temperature", type=float, default=500.0)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--friction-per-fs", type=float, default=0.01)
    parser.add_argument("--nve-ps", type=float, default=None, help="NVE length for the drift (default min(10, time))")
    parser.add_argument("--bond-threshold", type=float, default=0.5, help="Å")
    parser.add_argument("--sample-fs", type=float, default=50.0, help="h(r) sampling interval")
    parser.add_argument("--check-every", type=int, default=10, help="steps between bond checks")
    parser.add_argument("--skin", type=float, default=1.0)
    parser.add_argument("--max-reference", type=int, default=1000, help="reference frames used for h(r)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture each MD step as a CUDA graph (equiforce.sim.graphed; same trajectories)")
    parser.add_argument("--compile", action="store_true",
                        help="the model through one traced, torch.compile'd graph (equiforce.models.compiled)")
    parser.add_argument("--checkpoint", default=None,
                        help="NVT checkpoint file (default: next to --out, OUT.checkpoint.safetensors)")
    parser.add_argument("--checkpoint-ps", type=float, default=1.0, help="simulated time between checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint when there is one (same settings, checked)")
    parser.add_argument("--stop-after-ps", type=float, default=None,
                        help="end this invocation after this much NVT time, with a checkpoint to --resume from")
    parser.add_argument("--max-wall-min", type=float, default=None,
                        help="end this invocation (with a checkpoint) once this wall time has passed")
    args = parser.parse_args()
    if args.nve_ps is None:
        args.nve_ps = min(10.0, args.time_ps)
    checkpoint_path = Path(args.checkpoint or Path(args.out).with_suffix(".checkpoint.safetensors"))
    partial_path = Path(args.out).with_suffix(".partial.json")

    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    settings = run_settings(args)
    resumed = None
    if args.resume and checkpoint_path.exists():
        resumed = load_md_checkpoint(checkpoint_path, device=args.device, dtype=dtype)
        try:  # a checkpoint continues only the run that wrote it (--time-ps may grow, nothing else may change)
            check_settings(resumed.meta.get("settings", {}), settings, checkpoint_path)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        print(f"resuming from {checkpoint_path} at {resumed.state.step * args.timestep_fs / 1000:.3f} ps "
              f"({resumed.meta.get('phase')})")
    elif checkpoint_path.exists():
        raise SystemExit(f"{checkpoint_path} exists: pass --resume to continue that run, or remove it")
    model = load_model(args.model, device=args.device, dtype=dtype)
    configs = read_configurations(args.data, require_energy=False)  # only the geometries are used
    numbers = configs[0].numbers
    if any(not np.array_equal(c.numbers, numbers) for c in configs):
        raise SystemExit("the reference data must be frames of one molecule")
    rng = np.random.default_rng(args.seed)
    reference = np.stack([c.positions for c in configs])
    ref_frames = reference[rng.permutation(len(reference))[:args.max_reference]]
    criterion = BondCriterion(numbers, reference, threshold=args.bond_threshold)
    r, h_ref = distance_histogram(ref_frames, R_MAX, N_BINS)

    starts = rng.choice(len(configs), size=args.trajectories, replace=len(configs) < args.trajectories)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    previous_wall = 0.0
    if resumed is None:
        state = SimState.from_atoms([configs[i].to_atoms() for i in starts], device=args.device, dtype=dtype)
        maxwell_boltzmann(state, args.temperature, generator=generator, remove_com=False)
        counts, phase = np.zeros(N_BINS), "nvt"
    else:
        state, phase = resumed.state, resumed.meta.get("phase", "nvt")
        counts = resumed.arrays["hr_counts"].double().numpy().copy()
        previous_wall = float(resumed.meta.get("wall_time_s", 0.0))

    def checkpoint(md: MolecularDynamics, counts: np.ndarray, phase: str = "nvt") -> None:
        meta = {"settings": settings, "phase": phase, "wall_time_s": previous_wall + time.perf_counter() - started}
        save_md_checkpoint(checkpoint_path, state, md.flags, generator, {"hr_counts": torch.from_numpy(counts)}, meta)

    if phase == "nvt":
        md, counts, finished = run_nvt(model, state, criterion, args, generator, counts, resumed, checkpoint)
        if not finished:
            reached = state.step * args.timestep_fs / 1000
            so_far = nvt_summary(md, counts, r, h_ref, reached, args.timestep_fs)
            partial = {**run_record(args, previous_wall + time.perf_counter() - started), "complete": False,
                       "nvt_ps_done": reached, **so_far}
            atomic_write_text(partial_path, json.dumps(partial, indent=2) + "\n")
            print(f"stopped at {reached:.3f} ps of {args.time_ps} ps, {so_far['stable']} of {args.trajectories} "
                  f"intact so far (progress in {partial_path}); continue with --resume (checkpoint {checkpoint_path})")
            return
        checkpoint(md, counts, phase="nve")  # the NVE part is short: it restarts from here if interrupted
    else:
        md = MolecularDynamics(model, VelocityVerlet(args.timestep_fs))
        md.restore_flags(resumed.flags, state)

    summary = nvt_summary(md, counts, r, h_ref, args.time_ps, args.timestep_fs)

    final = state.to_atoms()  # NVE from the intact end states (all of them if none stayed intact)
    keep = torch.nonzero(~md.frozen).squeeze(-1).tolist() or list(range(state.n_systems))
    nve_state = SimState.from_atoms([final[b] for b in keep], device=args.device, dtype=dtype)
    nve_state.remove_com_momentum()
    nve = run_nve(model, nve_state, args, criterion)

    result: dict[str, Any] = {
        **run_record(args, previous_wall + time.perf_counter() - started), "complete": True, **summary,
        "thermostat": f"Langevin BAOAB, friction {args.friction_per_fs}/fs",
        "bond_threshold_A": args.bond_threshold, "bonds": int(criterion.pairs.shape[1]),
        **nve, "cuda_graph": md.graph_info, "resumed": resumed is not None,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    checkpoint_path.unlink(missing_ok=True)  # the result is written: nothing left to resume
    partial_path.unlink(missing_ok=True)
    width = max(len(k) for k in result)
    for key in ("trajectories", "stable", "mean_time_to_failure_ps", "hr_distance", "nve_drift_mev_atom_ps",
                "nve_drift_max_mev_atom_ps", "device", "dtype", "wall_time_s"):
        value = result[key]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)

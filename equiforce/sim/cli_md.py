"""``equiforce md MODEL STRUCTURES`` and ``equiforce relax MODEL STRUCTURES`` (registered by ``add_parser``).

Every structure in the file (extxyz or any ASE format) becomes one system of a batched run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from equiforce.errors import ConfigError, DataError
from equiforce.utils.atomic_io import atomic_write_text
from equiforce.utils.cli_types import (
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from equiforce.utils.digest import file_sha256

CHECKPOINT = "checkpoint.safetensors"


def _load(args: argparse.Namespace):
    import torch

    from equiforce.data.io import check_structures, read_atoms
    from equiforce.evaluate import check_known_elements, resolve_device
    from equiforce.models.file import load_model

    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.dtype) if args.dtype else None
    model = load_model(args.model, device=device, dtype=dtype)
    if args.edge_chunk is not None:
        from equiforce.models.potential import set_edge_chunk

        set_edge_chunk(model, args.edge_chunk or None)
    structures = read_atoms(args.structures, args.index)
    if not structures:
        raise DataError("no structures", source=str(args.structures))
    check_structures(structures, args.structures, model.cutoff)  # broken frames named before any step
    for frame, atoms in enumerate(structures):
        check_known_elements(model, atoms.numbers, str(args.structures), frame)
    return model, structures, str(device)


# the thermostat and barostat options: their defaults, and the ensembles that use them
ENSEMBLE_OPTIONS = {"friction": (0.01, ("nvt", "nvt-langevin")), "tau": (100.0, ("nvt-csvr", "npt")),
                    "pressure": (1.0, ("npt",)), "tau_p": (1000.0, ("npt",)), "compressibility": (4.5e-5, ("npt",))}


def _ensemble_options(args: argparse.Namespace) -> None:
    """An option the chosen ensemble does not use is an error (it would be ignored without a word); the others get
    their defaults."""
    ensemble = args.ensemble.lower()
    unused = [f"--{name.replace('_', '-')} (for {', '.join(users)})"
              for name, (_, users) in ENSEMBLE_OPTIONS.items()
              if getattr(args, name) is not None and ensemble not in users]
    if unused:
        raise ConfigError(f"--ensemble {args.ensemble} does not use {'; '.join(unused)}: drop it, or choose the "
                          "ensemble it belongs to")
    for name, (default, _) in ENSEMBLE_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def cmd_md(args: argparse.Namespace) -> int:
    from equiforce.sim.md import ENSEMBLES

    if args.ensemble.lower() not in ENSEMBLES:
        raise ConfigError(f"unknown ensemble {args.ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
    _ensemble_options(args)
    out = Path(args.out)
    from equiforce.utils.paths import check_output_directory

    check_output_directory(out, "--out")
    checkpoint = out / CHECKPOINT
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.resume and not checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint {checkpoint} (written with --checkpoint-every N)")
    earlier = [name for name in (CHECKPOINT, "summary.json", "thermo.csv", "final.extxyz", "trajectory.h5",
                                 "trajectory.extxyz", "trajectory.traj") if (out / name).exists()]
    if earlier and not (args.resume or args.overwrite):  # a long run's output is not replaced by a stray command
        resume = "pass --resume to continue it (it has a checkpoint), " if CHECKPOINT in earlier else "pass "
        raise ConfigError(f"--out {out} holds an earlier run ({', '.join(earlier)}): {resume}--overwrite to replace "
                          "it, or choose another --out")
    if (args.resume or args.checkpoint_every > 0) and args.format == "traj":
        raise ConfigError("--checkpoint-every and --resume need an h5 or extxyz trajectory (an ASE .traj file "
                          "cannot be cut back to a checkpoint)")
    model, structures, device = _load(args)
    if args.compile:
        from equiforce.models.compiled import compilable

        if not compilable(model):
            raise ConfigError(f"--compile: {args.model} holds a {type(model).__name__}, which runs uncompiled "
                              "(plain potentials and potentials with uncertainty heads compile)")
    stop_when = _sigma_stop(args, model)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # a new run in this directory: nothing of the last one may outlive a failure of this one
        for name in earlier:
            (out / name).unlink(missing_ok=True)
    trajectory = out / f"trajectory.{args.format}"
    resumable = args.checkpoint_every > 0 or args.resume
    # the model and the σ thresholds (run_md itself knows only that a stop criterion is set)
    tag = ({"model_sha256": file_sha256(args.model), "stop_sigma": args.stop_sigma,
            "stop_sigma_energy": args.stop_sigma_energy} if resumable else None)
    try:
        result = _run(args, model, structures, device, out, trajectory, checkpoint, resumable, tag, stop_when)
    except Exception:
        if created and not any(out.iterdir()):  # refused before any output: leave no empty directory
            out.rmdir()
        raise
    from ase.io import write

    write(out / "final.extxyz", result.atoms)
    rate = result.steps * sum(len(a) for a in structures) / max(result.wall_time_s, 1e-9)
    summary = {"systems": len(structures), "steps": result.steps, "total_steps": result.state.step,
               "resumed": bool(result.info.get("resumed", False)), "wall_time_s": result.wall_time_s,
               "atom_steps_per_s": rate, "neighbor_builds": result.neighbor_builds,
               "nonfinite_systems": [int(b) for b in (result.nonfinite_step >= 0).nonzero()[0]]}
    if stop_when is not None:  # which systems crossed the σ threshold, and at which step
        summary["sigma_stopped"] = {str(int(b)): int(result.stopped_step[b])
                                    for b in (result.stopped_step >= 0).nonzero()[0]}
        summary["stop_mode"] = args.stop_mode
    for key in ("cuda_graph", "compile"):  # how the steps ran: captured, compiled (and the compilation's cost)
        if key in result.info:
            summary[key] = result.info[key]
    suspect = _diverged(out / "thermo.csv", args.temperature)
    if suspect:
        summary["diverged_systems"] = sorted(suspect)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if suspect:
        worst = max(suspect.items(), key=lambda item: item[1][1])
        print(f"warning: {len(suspect)} of {len(structures)} system(s) look diverged (system {worst[0]}: "
              f"{worst[1][0]}); lower --timestep (systems listed in summary.json)", file=sys.stderr)
    if args.resume and result.steps == 0:
        print(f"the run in {out} is already at step {result.state.step} (--steps {args.steps}): nothing to do; a "
              "larger --steps extends it")
    print(f"{result.steps} steps of {len(structures)} system(s) in {result.wall_time_s:.1f} s "
          f"({rate:.3g} atom-steps/s); wrote {trajectory}, {out / 'thermo.csv'}, {out / 'final.extxyz'}")
    if stop_when is not None:
        verb = "frozen" if args.stop_mode == "freeze" else "flagged"
        print(f"σ threshold crossed by {len(summary['sigma_stopped'])} of {len(structures)} system(s) ({verb}; "
              f"first steps in {out / 'summary.json'})")
    return 0


def _run(args: argparse.Namespace, model, structures, device: str, out: Path, trajectory: Path, checkpoint: Path,
         resumable: bool, tag: dict | None, stop_when):
    """``run_md`` with the command's options."""
    from equiforce.sim.md import run_md

    return run_md(model, structures, ensemble=args.ensemble, temperature_K=args.temperature,
                  timestep_fs=args.timestep, steps=args.steps, friction_per_fs=args.friction, tau_fs=args.tau,
                  pressure_bar=args.pressure, tau_p_fs=args.tau_p, compressibility_per_bar=args.compressibility,
                  seed=args.seed, device=device, trajectory=trajectory, trajectory_interval=args.every,
                  log=out / "thermo.csv", log_interval=args.log_every, progress=not args.no_progress,
                  keep_thermo=False, cuda_graph=args.cuda_graph, compile=args.compile,
                  checkpoint=checkpoint if resumable else None,
                  checkpoint_interval=args.checkpoint_every or 10_000, resume=args.resume, checkpoint_tag=tag,
                  stop_when=stop_when, stop_mode=args.stop_mode, stop_check_interval=args.stop_check_every)


DRIFT_PER_ATOM = 0.1  # eV: a conserved quantity that moved this much per atom means the integration broke down
HOT = 3.0  # without a conserved quantity (npt): a final temperature this many times the target's


def _diverged(thermo: Path, target_K: float) -> dict[int, tuple[str, float]]:
    """Systems whose thermo log says the integration broke down (a large time step, a model far outside its data):
    the conserved quantity drifted by more than :data:`DRIFT_PER_ATOM` per atom, or, where none is tracked, the
    temperature ended above :data:`HOT` times the target.  ``{system: (what, how bad)}``."""
    import csv

    first: dict[int, dict[str, str]] = {}
    last: dict[int, dict[str, str]] = {}
    try:
        with open(thermo, newline="") as handle:
            for row in csv.DictReader(handle):
                system = int(row["system"])
                first.setdefault(system, row)
                last[system] = row
    except (OSError, ValueError, KeyError):
        return {}
    suspect = {}
    for system, end in last.items():
        start = first[system]
        try:
            if end.get("conserved"):
                drift = abs(float(end["conserved"]) - float(start["conserved"])) / int(end["n_atoms"])
                if not drift <= DRIFT_PER_ATOM:
                    suspect[system] = (f"conserved energy drifted {drift:.3g} eV/atom", drift / DRIFT_PER_ATOM)
            elif target_K > 0 and not float(end["temperature"]) <= HOT * target_K:
                ratio = float(end["temperature"]) / target_K
                suspect[system] = (f"ended at {float(end['temperature']):.0f} K for a target of {target_K:g} K",
                                   ratio / HOT)
        except ValueError:
            continue
    return suspect


def _sigma_stop(args: argparse.Namespace, model):
    """The σ stop hook the options ask for (None without them); refuses a model that carries no uncertainty."""
    if args.stop_sigma is None and args.stop_sigma_energy is None:
        return None
    from equiforce.uq.base import UQModel
    from equiforce.uq.stop import sigma_stop

    if not isinstance(model, UQModel):
        raise ConfigError(f"--stop-sigma/--stop-sigma-energy need a model with uncertainty; {args.model} is a "
                          "plain potential (train one with `equiforce train-uq`)")
    return sigma_stop(forces=args.stop_sigma, energy_per_atom=args.stop_sigma_energy)


def _check_output_file(path: Path) -> None:
    """An output file ASE can write: not a directory, a format its name says, a directory to put it in."""
    from ase.io.formats import extension2format, ioformats

    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file name such as relaxed.extxyz")
    suffix = path.suffix.lstrip(".").lower()
    fmt = extension2format.get(suffix) or ioformats.get(suffix)  # .xyz → extxyz; .extxyz is a format's name
    if fmt is None or not fmt.can_write:
        named = f"a format named by '.{suffix}'" if suffix else "a file without a suffix (the format is not said)"
        raise ConfigError(f"--out {path}: ASE cannot write {named}; use .extxyz (or .traj)")
    path.parent.mkdir(parents=True, exist_ok=True)


def cmd_relax(args: argparse.Namespace) -> int:
    from ase.io import write

    from equiforce.sim.relax import relax

    if args.pressure and not args.cell:
        raise ConfigError("--pressure acts on the cell: add --cell (or leave --pressure out)")
    _check_output_file(Path(args.out))  # said before the relaxation, not after it
    model, structures, device = _load(args)
    if args.cell and not all(a.pbc.all() and abs(a.cell.volume) > 1e-8 for a in structures):
        raise ConfigError(f"--cell relaxes periodic cells: every structure in {args.structures} must be periodic "
                          "in all three directions with a non-zero volume")
    result = relax(model, structures, fmax=args.fmax, max_steps=args.steps, relax_cell=args.cell,
                   scalar_pressure_bar=args.pressure, device=device)
    for b, atoms in enumerate(result.atoms):  # energy, forces (stress) are attached as the structure's results
        atoms.info["converged"] = bool(result.converged[b])
        if result.enthalpy is not None:
            atoms.info["enthalpy"] = float(result.enthalpy[b])
    write(args.out, result.atoms)
    print(f"{int(result.converged.sum())}/{len(result.atoms)} converged (fmax {args.fmax} eV/Å); wrote {args.out}")
    return 0 if result.converged.all() else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("structures", help="structures (extxyz or any ASE format); each one a system of the batch")
    p.add_argument("--index", default=":", help="frames to read, ASE slice syntax (default all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="default: as saved")
    p.add_argument("--edge-chunk", type=non_negative_int, default=None,
                   help="compute messages this many edges at a time (less memory, same result; 0: all at "
                        "once; default: automatic, 2048 on a CPU for large systems)")


def add_parser(sub) -> None:
    """Register ``md`` and ``relax`` on the CLI's sub-parsers."""
    p = sub.add_parser("md", help="batched molecular dynamics of every structure in a file")
    _common(p)
    p.add_argument("--ensemble", default="nvt", help="nve, nvt (Langevin), nvt-csvr or npt (default nvt)")
    p.add_argument("--temperature", type=non_negative_float, default=300.0, help="K")
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs")
    p.add_argument("--steps", type=non_negative_int, default=1000)
    p.add_argument("--friction", type=non_negative_float, default=None,
                   help="Langevin friction, 1/fs (nvt; default 0.01)")
    p.add_argument("--tau", type=positive_float, default=None,
                   help="CSVR thermostat time, fs (nvt-csvr, npt; default 100)")
    p.add_argument("--pressure", type=finite_float, default=None, help="NPT pressure, bar (npt; default 1)")
    p.add_argument("--tau-p", type=positive_float, default=None, help="barostat time, fs (npt; default 1000)")
    p.add_argument("--compressibility", type=positive_float, default=None,
                   help="1/bar, sets the barostat's time scale (npt; default 4.5e-5)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--format", default="h5", choices=["h5", "extxyz", "traj"], help="trajectory format")
    p.add_argument("--every", type=positive_int, default=100, help="steps between trajectory frames")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between thermo lines")
    p.add_argument("--out", default="runs/md", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each MD step as a CUDA graph and replay it (small systems on a GPU, where kernel "
                        "launches dominate; same results; falls back to ordinary steps, with a warning, if the "
                        "step cannot be captured)")
    p.add_argument("--compile", action="store_true",
                   help="energies and forces (and σ) through one traced, torch.compile'd graph (plain "
                        "potentials and potentials with uncertainty heads, not ensembles; a one-off compilation "
                        "of about a minute; for long runs: on a CPU 1.5-2x the steps per second for small "
                        "molecules, nothing for large boxes)")
    p.add_argument("--stop-sigma", type=positive_float, default=None, metavar="EV_PER_A",
                   help="stop a system once its largest per-atom force σ exceeds this (a model with uncertainty)")
    p.add_argument("--stop-sigma-energy", type=positive_float, default=None, metavar="EV_PER_ATOM",
                   help="stop a system once its energy σ per atom exceeds this")
    p.add_argument("--stop-mode", default="freeze", choices=["freeze", "flag"],
                   help="freeze: a stopped system stops moving while the others go on; flag: record and go on")
    p.add_argument("--stop-check-every", type=positive_int, default=1, help="steps between σ checks")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (OUT/checkpoint.safetensors; rounded up to a multiple of "
                        "--every and --log-every; 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint (same settings, model and structures; "
                        "--steps counts from the original start, so a larger value extends a finished run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's output in OUT (without it, such a directory is refused)")
    p.set_defaults(func=cmd_md)

    p = sub.add_parser("relax", help="FIRE relaxation of every structure in a file (batched)")
    _common(p)
    p.add_argument("--fmax", type=positive_float, default=0.05, help="eV/Å")
    p.add_argument("--steps", type=non_negative_int, default=1000)
    p.add_argument("--cell", action="store_true", help="relax the cell too (periodic structures)")
    p.add_argument("--pressure", type=finite_float, default=0.0, help="bar, with --cell")
    p.add_argument("--out", default="relaxed.extxyz",
                   help="file of the relaxed structures, its format from its suffix (default relaxed.extxyz; md's "
                        "--out is a directory)")
    p.set_defaults(func=cmd_relax)

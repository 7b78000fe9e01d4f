"""MD speed: atom-steps/s and peak memory per atom, equiforce's native engine vs MACE through ASE.

    python benchmarks/md_speed.py --device cpu --out md_speed.json
    python benchmarks/md_speed.py --device cuda --sizes 864,4000,16384,32000 --max-atoms 300000 \
        --molecules 1000 --out md_speed_gpu.json

Two parts, one run:

1. fcc Cu boxes from 256 atoms up (``--sizes``, capped by ``--max-atoms``), model of the size the issue fixes
   (128x0e+128x1o, spherical harmonics to 3, correlation 3, 2 layers, 5 Å, random weights): equiforce's
   native NVE step (neighbour list in the skin included) and MACE (mace-torch in its own venv, through ASE's
   VelocityVerlet, ``benchmarks/peers/mace/md_speed_mace.py``) at the same size;
2. many small molecules (an rMD17 aspirin copied ``--molecules`` times) in one native state, one aspirin
   alone in the native engine, and one molecule at a time through ASE with the equiforce calculator (and
   with MACE).

``--cuda-graph`` adds, for every native row (Cu boxes up to 4,000 atoms), the same system run by the engine's
loop with the whole step captured as a CUDA graph (mode ``graph``; :mod:`equiforce.sim.graphed`); its row
says how many steps were replayed and, if the capture failed, why.  ``--compile`` adds, for every native
row, the same run with the model's energy → forces traced and ``torch.compile``'d (mode ``compiled``;
:mod:`equiforce.models.compiled`); the compilation happens in the first evaluation, outside the timing, and
its seconds are in the row (``compile_s``). ``--uq-heads`` puts uncertainty heads on the model, so every
step also computes σ (the rows then carry ``uq: "heads"``).  ``--bridges`` adds, for each Cu box and the single
aspirin, the same structure driven by other engines through equiforce: ASE's VelocityVerlet (mode ``ase``),
OpenMM's VerletIntegrator via ``PythonForce`` (``openmm``) and LAMMPS's ``fix nve`` via ``fix external``
(``lammps``) — what each engine's per-step crossing into Python costs against the native loop.

Every measurement runs in its own process, so peak memory is clean: on CPU the rise of the peak resident set
(VmHWM) over the resident set just before the timed steps, on CUDA ``torch.cuda.max_memory_allocated``.
JSON ``rows``: engine, mode, system, natoms, n_systems, device, dtype, ms_per_step, atom_steps_per_s,
peak_mem_mb_per_atom; ``failed`` lists measurements that did not finish (e.g. out of memory) and why.

``--ramp`` finds the largest box that fits: after the listed sizes it keeps growing the Cu box (about
``--ramp-factor`` times the atoms each time) until equiforce's step fails or runs past ``--timeout``, asking
MACE at each size until MACE fails; JSON ``largest_fit`` holds each engine's largest box that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from equiforce.models import ModelSpec, build_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.cli_types import positive_int  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

# the peer venv (benchmarks/peers/mace/install.sh), or another interpreter that imports mace-torch 0.3.16 (the GPU
# suite points this at a wrapper over carried wheels, since the lent GPU machine cannot build a venv)
MACE_PYTHON = Path(os.environ.get("EQUIFORCE_MACE_PYTHON")
                   or ROOT / "benchmarks" / "peers" / ".venv-mace" / "bin" / "python")
MACE_SCRIPT = ROOT / "benchmarks" / "peers" / "mace" / "md_speed_mace.py"
ASPIRIN = ROOT.parent / "shared" / "data" / "rmd17" / "rmd17_aspirin_train_01.npz"
BRIDGES = ("ase", "openmm", "lammps")  # --bridges: other engines driving one structure through equiforce
GRAPH_MAX_ATOMS = 4000  # --cuda-graph rows for Cu boxes up to this size (launches matter little beyond)
REFERENCE_SPEC = dict(channels=128, max_l=1, sh_lmax=3, correlation=3, num_layers=2, cutoff=5.0,
                      radial_mlp=[64, 64, 64], num_radial=8, avg_num_neighbors=40.0)


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def box_side(natoms: float) -> int:
    """Unit cells per edge of the cubic fcc box closest to ``natoms`` atoms (it holds 4 n³)."""
    return max(1, round((natoms / 4) ** (1 / 3)))


def cu_box(natoms: int):
    from ase.build import bulk

    n = box_side(natoms)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    atoms.rattle(0.05, seed=0)
    return atoms


def aspirin(path: str | Path = ASPIRIN):
    from equiforce.data.io import read_configurations

    path = Path(path)
    if not path.is_file():
        from ase.build import molecule

        return molecule("CH3CH2OH")  # no rMD17 here: a stand-in molecule, reported under its own size
    return read_configurations(path)[0].to_atoms()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: native batched NVE or one molecule through ASE."""
    from ase import units
    from ase.md.verlet import VelocityVerlet as AseVerlet

    import equiforce
    from equiforce.sim.evaluator import BatchEvaluator
    from equiforce.sim.integrators import VelocityVerlet
    from equiforce.sim.md import MolecularDynamics
    from equiforce.sim.state import SimState, maxwell_boltzmann

    dtype = getattr(torch, args.dtype)
    if args.system == "cu":
        systems = [cu_box(args.natoms)]
    else:
        molecule = aspirin(args.aspirin)  # read the file once, not once per copy
        systems = [molecule.copy() for _ in range(args.count)]
    elements = sorted({int(z) for a in systems for z in a.numbers})
    torch.manual_seed(0)
    model = build_model(ModelSpec(elements=elements, **REFERENCE_SPEC), dtype).to(args.device).eval()
    edge_chunk = "auto" if args.edge_chunk < 0 else args.edge_chunk or None
    model.set_edge_chunk(edge_chunk)
    if args.uq_heads:  # σ in every step: the cheap single-model estimator (untrained heads: the cost is the same)
        from equiforce.uq.heads import UQHeads, UQPotential

        heads = UQHeads(REFERENCE_SPEC["channels"], n_elements=len(elements)).to(args.device, dtype)
        model = UQPotential(model, heads).to(args.device).eval()
    natoms = sum(len(a) for a in systems)
    cuda = args.device.startswith("cuda")
    info: dict[str, Any] = {}
    warmup = args.warmup
    if args.mode in ("native", "graph", "compiled"):
        state = SimState.from_atoms(systems, device=args.device, dtype=dtype)
        maxwell_boltzmann(state, 300.0, generator=torch.Generator(args.device).manual_seed(0))
    if args.mode in ("native", "compiled"):
        integrator = VelocityVerlet(0.5)
        evaluate = BatchEvaluator(model, skin=0.5, compile=args.mode == "compiled")
        outputs = integrator.evaluate(state, evaluate)  # compiles, for mode "compiled" (outside the timing)
        if args.mode == "compiled":
            info.update(evaluate.compile_report())  # compiled, compile_s (and compile_error if it fell back)

        def steps(count: int) -> None:
            nonlocal outputs
            for _ in range(count):
                outputs = integrator.step(state, outputs, evaluate)
    elif args.mode == "graph":  # the engine's own loop with the step captured as a CUDA graph
        md = MolecularDynamics(model, VelocityVerlet(0.5), skin=0.5, cuda_graph=True)
        quiet = dict(keep_thermo=False, log_interval=10**9, trajectory_interval=10**9)
        warmup = max(warmup, 5)  # the eager warm-up steps and the capture itself stay out of the timing

        def steps(count: int) -> None:  # one run() for all the timed steps: its per-call checks happen once
            result = md.run(state, count, **quiet)
            info.update(result.info.get("cuda_graph", {}))
    elif args.mode == "openmm":  # OpenMM's Verlet integrator driving the model through PythonForce
        import openmm

        from equiforce.sim.openmm_force import openmm_system

        setup = openmm_system(systems[0], model, device=args.device)
        omm_integrator = openmm.VerletIntegrator(0.0005)  # ps
        platform = openmm.Platform.getPlatformByName("Reference")  # the force is on the host either way
        context = openmm.Context(setup.system, omm_integrator, platform)
        context.setPositions(setup.positions)
        context.setVelocitiesToTemperature(300.0, 0)
        info["platform"] = platform.getName()

        def steps(count: int) -> None:
            omm_integrator.step(count)
    elif args.mode == "lammps":  # LAMMPS's fix nve driving the model through fix external
        from equiforce.sim.lammps_fix import lammps_from_atoms

        lmp, lammps_potential = lammps_from_atoms(systems[0], model, device=args.device)
        for command in ("velocity all create 300.0 1 mom yes", "fix nve all nve", "timestep 0.0005", "thermo 0"):
            lmp.command(command)
        lammps_potential.run(0)

        def steps(count: int) -> None:
            lmp.command(f"run {count} pre no post no")  # no set-up evaluation between timed runs
    else:
        atoms = systems[0]
        atoms.calc = equiforce.Calculator(model, device=args.device)
        dyn = AseVerlet(atoms, 0.5 * units.fs)

        def steps(count: int) -> None:
            dyn.run(count)
    timed = args.steps if args.system == "cu" else max(args.steps, args.molecule_steps)
    steps(warmup)
    _sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    start = time.perf_counter()
    steps(timed)
    _sync(args.device)
    seconds = (time.perf_counter() - start) / timed
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max(0.0, rss_mb("VmHWM") - before)
    native = args.mode in ("native", "graph", "compiled")
    measured = natoms if native else len(systems[0])
    row = {"engine": "equiforce", "mode": args.mode, "natoms": measured,
           "n_systems": len(systems) if native else 1, "device": args.device, "dtype": args.dtype,
           "ms_per_step": 1e3 * seconds, "atom_steps_per_s": measured / seconds,
           "peak_mem_mb_per_atom": peak / measured, "edge_chunk": edge_chunk}
    if args.uq_heads:
        row["uq"] = "heads"
    if args.mode in ("compiled", "openmm"):
        row.update(info)
    if args.mode == "graph":
        row["cuda_graph"] = info  # captures, replays, eager steps, and why not captured (None: it was)
    return row


def run_child(command: list[str], env: dict[str, str] | None, timeout: float) -> dict[str, Any]:
    """Run a measurement process; its last stdout line is the JSON row, or ``{"error": why}`` when it failed
    (out of memory, killed, an exception) or ran past ``timeout``."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  timed out: {' '.join(command[-8:])}", file=sys.stderr)
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"  failed ({done.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return {"error": f"exit {done.returncode}: {' | '.join(tail)[-300:]}"}
    return json.loads(lines[-1])


def cu_sizes(listed: list[int], ramp: bool, max_atoms: int, factor: float = 2.0) -> Iterator[int]:
    """The Cu boxes to measure: the listed atom counts, then (``ramp``) ever larger boxes — about ``factor`` times
    the atoms each, never the same box twice — up to ``max_atoms``; the caller stops the ramp at the first
    failure."""
    last = 0
    for natoms in listed:
        if 4 * box_side(natoms) ** 3 <= max_atoms:
            last = max(last, box_side(natoms))
            yield natoms
    if not ramp:
        return
    n = max(last, 1)
    while True:
        n = max(n + 1, box_side(factor * 4 * n**3))
        if 4 * n**3 > max_atoms:
            return
        yield 4 * n**3


def equiforce_row(args: argparse.Namespace, system: str, mode: str, natoms: int = 0, count: int = 1):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--system", system, "--mode", mode,
               "--natoms", str(natoms), "--count", str(count), "--device", args.device, "--dtype", args.dtype,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--aspirin", args.aspirin, "--edge-chunk", str(args.edge_chunk),
               "--molecule-steps", str(args.molecule_steps)] + (["--uq-heads"] if args.uq_heads else [])
    return run_child(command, None, args.timeout)


def mace_row(args: argparse.Namespace, natoms: int = 0, xyz: str | None = None):
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    command = [str(MACE_PYTHON), str(MACE_SCRIPT), "--device", args.device, "--dtype", args.dtype,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--xyz", xyz] if xyz else ["--repeat", str(box_side(natoms))]
    return run_child(command, env, args.timeout)


HEADER = f"{'engine':<10} {'mode':<7} {'system':<8} {'atoms':>7} {'systems':>7} {'ms/step':>10} " \
         f"{'atom-steps/s':>13} {'MB/atom':>8}"


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['engine']:<10} {r['mode']:<7} {r['system']:<8} {r['natoms']:>7} {r['n_systems']:>7} "
            f"{r['ms_per_step']:>10.1f} {r['atom_steps_per_s']:>13.1f} {r['peak_mem_mb_per_atom']:>8.3f}")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(format_row(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,864", help="comma-separated Cu atom counts (4 n³ each)")
    parser.add_argument("--max-atoms", type=int, default=1_000_000, help="skip Cu boxes larger than this")
    parser.add_argument("--ramp", action="store_true",
                        help="after --sizes, keep doubling the Cu box until equiforce's step fails (out of memory) "
                             "or runs past --timeout: JSON 'largest_fit' is the largest box that ran")
    parser.add_argument("--ramp-factor", type=float, default=2.0, help="growth in atoms per ramp step")
    parser.add_argument("--molecules", type=int, default=32, help="aspirins in one native state (0: skip)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per measurement")
    parser.add_argument("--molecule-steps", type=int, default=0,
                        help="timed steps for the aspirin rows, if more than --steps (a step of one molecule on a "
                             "GPU takes about a millisecond: a few steps would time noise)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-mace", action="store_true", help="skip the MACE peer")
    parser.add_argument("--aspirin", default=str(ASPIRIN), help="rMD17 aspirin file (its first frame is the molecule)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--edge-chunk", type=int, default=-1,
                        help="equiforce: compute messages this many edges at a time (Potential.set_edge_chunk; "
                             "0: all at once; -1, the default: the model's automatic choice)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each native row with the step captured as a CUDA graph (mode 'graph', "
                             "the engine's MolecularDynamics loop; on a CPU the same loop runs eagerly)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each native row with the model traced and torch.compile'd (mode "
                             "'compiled', equiforce.models.compiled; the compilation stays out of the timing)")
    parser.add_argument("--bridges", action="store_true",
                        help="also time one structure (each Cu box, one aspirin) driven by other engines through "
                             "equiforce's bridges: ASE (mode 'ase'), OpenMM's PythonForce ('openmm') and LAMMPS's "
                             "fix external ('lammps'); each skipped with a note where the engine is not installed")
    parser.add_argument("--uq-heads", action="store_true",
                        help="equiforce rows with uncertainty heads on the model (σ computed in every step)")
    parser.add_argument("--out", default="md_speed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", default="cu", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="native", help=argparse.SUPPRESS)
    parser.add_argument("--natoms", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    molecule_source = str(args.aspirin)
    if not Path(args.aspirin).is_file():  # the molecule rows' structure
        if Path(args.aspirin) != ASPIRIN:
            parser.error(f"--aspirin {args.aspirin}: file not found")
        molecule_source = "ethanol (stand-in: no rMD17 aspirin here)"
        print(f"note: no rMD17 aspirin at {args.aspirin}: ethanol (9 atoms) stands in for the 'aspirin' rows",
              file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []  # e.g. out of memory: the largest size that fits is the last row
    print(HEADER, flush=True)

    def add(row: dict[str, Any], system: str, engine: str = "equiforce", natoms: int = 0) -> bool:
        if "error" in row:
            failed.append({"engine": engine, "system": system, "natoms": natoms, "error": row["error"]})
            print(f"{engine:<10} {system:<8} {natoms:>7} atoms: failed ({row['error'][:80]})", flush=True)
            return False
        row["system"] = system
        rows.append(row)
        print(format_row(row), flush=True)
        return True

    listed = [int(s) for s in args.sizes.split(",") if s.strip()]
    largest_fit: dict[str, Any] = {"equiforce": None, "mace": None}
    mace_fits = not args.no_mace and MACE_PYTHON.exists()
    peer = ("not asked (--no-mace)" if args.no_mace else "measured" if MACE_PYTHON.exists()
            else f"absent: no {MACE_PYTHON} (bash benchmarks/peers/mace/install.sh, or EQUIFORCE_MACE_PYTHON)")
    if not args.no_mace and not MACE_PYTHON.exists():  # said, not silently left out of the table
        print(f"MACE peer {peer}", flush=True)
    for natoms in cu_sizes(listed, args.ramp, args.max_atoms, args.ramp_factor):
        actual = 4 * box_side(natoms) ** 3
        fits = add(equiforce_row(args, "cu", "native", natoms=natoms), "fcc-Cu", natoms=actual)
        if fits:
            largest_fit["equiforce"] = max(largest_fit["equiforce"] or 0, actual)
        if args.compile:
            add(equiforce_row(args, "cu", "compiled", natoms=natoms), "fcc-Cu", natoms=actual)
        if args.cuda_graph and actual <= GRAPH_MAX_ATOMS:
            add(equiforce_row(args, "cu", "graph", natoms=natoms), "fcc-Cu", natoms=actual)
        if args.bridges:
            for mode in BRIDGES:
                add(equiforce_row(args, "cu", mode, natoms=natoms), "fcc-Cu", natoms=actual)
        if mace_fits:  # once MACE has failed at a size it is not asked for larger ones
            mace_fits = add(mace_row(args, natoms=natoms), "fcc-Cu", "mace", natoms=actual)
            if mace_fits:
                largest_fit["mace"] = max(largest_fit["mace"] or 0, actual)
        if args.ramp and not fits:
            break  # the ramp ends at equiforce's first failure
    if args.molecules > 0:
        add(equiforce_row(args, "aspirin", "native", count=args.molecules), "aspirin")
        if args.compile:
            add(equiforce_row(args, "aspirin", "compiled", count=args.molecules), "aspirin")
        if args.cuda_graph:
            add(equiforce_row(args, "aspirin", "graph", count=args.molecules), "aspirin")
        if args.molecules > 1:  # one molecule in the native engine: the launch-bound case
            add(equiforce_row(args, "aspirin", "native"), "aspirin")
            if args.compile:
                add(equiforce_row(args, "aspirin", "compiled"), "aspirin")
            if args.cuda_graph:
                add(equiforce_row(args, "aspirin", "graph"), "aspirin")
        for mode in BRIDGES if args.bridges else ("ase",):
            add(equiforce_row(args, "aspirin", mode), "aspirin")
        if not args.no_mace and MACE_PYTHON.exists():
            with tempfile.TemporaryDirectory() as tmp:
                from ase.io import write

                path = os.path.join(tmp, "aspirin.xyz")
                write(path, aspirin(args.aspirin))
                add(mace_row(args, xyz=path), "aspirin", "mace")
    print()
    print_table(rows)
    result = {"benchmark": "md_speed", "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
              "dtype": args.dtype, "host": platform.node(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "model": REFERENCE_SPEC, "rows": rows, "failed": failed, "mace_peer": peer,
              "molecule": molecule_source}
    if args.ramp:
        result["largest_fit"] = largest_fit  # largest Cu box each engine ran (None: not one)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)

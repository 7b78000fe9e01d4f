"""equiforce and MACE on the same rMD17 split, budget and device, one after the other, in one table.

    python benchmarks/compare_rmd17.py --train ../shared/data/rmd17/rmd17_aspirin_train_01.npz \
        --test ../shared/data/rmd17/rmd17_aspirin_test_01.npz --budget-min 30 --device cpu --dtype float32 \
        --mace-hidden-irreps 64x0e+64x1o --out runs/compare/aspirin_cpu.json -- --preset mace64

Arguments after ``--`` go to ``benchmarks/rmd17.py`` (equiforce's model and training options).  The MACE
peer must be installed first (``benchmarks/peers/mace/install.sh``).  The two runs never overlap: timing
two things at once on the same cores would make both numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from equiforce.utils.cli_types import positive_float  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

PEER_PYTHON = HERE / "peers" / ".venv-mace" / "bin" / "python"
QUANTITIES = (("e_mae_mev", "E MAE meV"), ("f_mae_mev_a", "F MAE meV/Å"), ("e_rmse_mev", "E RMSE meV"),
              ("f_rmse_mev_a", "F RMSE meV/Å"), ("epochs", "epochs"), ("configs_per_s", "configs/s"),
              ("train_configs_per_s", "step configs/s"), ("model_params", "params"))


def split_sizes(extra: list[str]) -> tuple[int, int]:
    """The train/valid sizes equiforce will use (``--n-train``/``--n-valid`` after ``--``, else 950/50), so the
    split written for the peer is the very same one."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--n-train", type=int, default=950)
    p.add_argument("--n-valid", type=int, default=50)
    known, _ = p.parse_known_args(extra)
    return known.n_train, known.n_valid


def prepare_split(args: argparse.Namespace, split_dir: Path, extra: list[str]) -> None:
    from rmd17 import split, write_split

    from equiforce.data.io import read_configurations

    n_train, n_valid = split_sizes(extra)
    train, valid = split(read_configurations(args.train, require_forces=True), n_train, n_valid, args.split_seed)
    write_split(train, split_dir / "train.xyz")
    write_split(valid, split_dir / "valid.xyz")
    write_split(read_configurations(args.test, require_forces=True), split_dir / "test.xyz")


def run_equiforce(args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    command = [sys.executable, str(HERE / "rmd17.py"), "--train", args.train, "--test", args.test,
               "--budget-min", str(args.budget_min), "--device", args.device, "--dtype", args.dtype,
               "--split-seed", str(args.split_seed), "--out", str(out), "--work-dir", str(out.parent / "equiforce"),
               *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def run_mace(args: argparse.Namespace, split_dir: Path, out: Path) -> dict:
    if not PEER_PYTHON.exists():
        raise SystemExit(f"MACE peer not installed ({PEER_PYTHON}); run benchmarks/peers/mace/install.sh")
    dtype = args.dtype
    command = [str(PEER_PYTHON), str(HERE / "peers" / "mace" / "train_rmd17.py"), "--split", str(split_dir),
               "--budget-min", str(args.budget_min), "--device", args.device, "--dtype", dtype,
               "--hidden-irreps", args.mace_hidden_irreps, "--work-dir", str(out.parent / "mace"),
               "--molecule", args.molecule, "--out", str(out)]
    print("$", " ".join(command), flush=True)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(results: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("engine")
    for _, label in QUANTITIES:
        t.add_column(label, justify="right")
    for engine, r in results.items():  # results of older runs may lack a column: "-"
        t.add_row(engine, *("-" if r.get(key) is None else f"{r[key]:,.2f}" if isinstance(r[key], float)
                            else f"{r[key]:,}" for key, _ in QUANTITIES))
    eq, mace = results["equiforce"], results["mace"]
    t.add_row("equiforce / mace", *(f"{eq[k] / mace[k]:.2f}x" if mace.get(k) and eq.get(k) is not None else "-"
                                    for k, _ in QUANTITIES))
    Console().print(t)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--molecule", default=None)
    p.add_argument("--budget-min", type=positive_float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="both engines train in it (TF32 has no MACE counterpart here: use rmd17.py --dtype tf32 "
                        "alone)")
    p.add_argument("--mace-hidden-irreps", default="128x0e+128x1o")
    p.add_argument("--split-seed", type=int, default=1)
    p.add_argument("--skip-mace", action="store_true", help="reuse an earlier mace.json in the output folder")
    p.add_argument("--only", choices=["equiforce", "mace"], default=None,
                   help="run one engine and write its JSON into the output folder (combine later with --skip-mace)")
    p.add_argument("--out", default="runs/compare/results.json")
    args = p.parse_args(argv)
    args.molecule = args.molecule or Path(args.train).stem.replace("rmd17_", "").split("_")[0]
    out = Path(args.out)
    work = out.parent / out.stem
    # said before equiforce trains, not after its whole budget
    if args.only != "equiforce" and not args.skip_mace and not PEER_PYTHON.exists():
        raise SystemExit(f"MACE peer not installed ({PEER_PYTHON}); run benchmarks/peers/mace/install.sh, or "
                         "--only equiforce")
    if args.skip_mace and args.only is None and not (work / "mace.json").is_file():
        raise SystemExit(f"--skip-mace: no {work / 'mace.json'} from an earlier run (the folder is named after "
                         "--out: give the --out of the run that measured MACE, or copy its mace.json there)")
    work.mkdir(parents=True, exist_ok=True)
    split_dir = work / "split"
    prepare_split(args, split_dir, extra)
    if args.only == "mace":
        run_mace(args, split_dir, work / "mace.json")
        return
    results = {"equiforce": run_equiforce(args, extra, work / "equiforce.json")}
    if args.only == "equiforce":
        return
    mace_out = work / "mace.json"
    results["mace"] = json.loads(mace_out.read_text()) if args.skip_mace else run_mace(args, split_dir, mace_out)
    ratios = {key: results["equiforce"][key] / results["mace"][key] for key, _ in QUANTITIES
              if results["mace"].get(key) and results["equiforce"].get(key) is not None}
    table(results, f"rMD17 {args.molecule}: {args.budget_min:g} min on {args.device} ({args.dtype})")
    out.write_text(json.dumps({**results, "ratios": ratios, "command": " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    run_script(main)

"""Command line: ``equiforce train CONFIG.yaml``, ``equiforce eval MODEL DATA [--uq]``, ``equiforce demo``,
``equiforce train-uq CONFIG.yaml`` (a model with calibrated uncertainty, see docs/uncertainty.md).

Mistakes the user can fix (a bad config key, a broken data frame, a file that is not a model) end with
one ``error: ...`` line on stderr and exit status 2 — a traceback would bury the one line that matters.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equiforce.errors import EquiforceError
from equiforce.utils.cli_types import positive_float, positive_int

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _metrics_table(title: str, metrics: dict[str, Any]):
    from rich.table import Table

    from equiforce.train.metrics import UNITS

    labels = {"energy_per_atom": "energy / atom", "energy": "energy / structure", "forces": "forces",
              "stress": "stress", "hessian_vp": "Hessian · v (random v)", "hessian": "Hessian entries"}
    table = Table(title=title)
    for column in ("quantity", "MAE", "RMSE", "unit"):
        table.add_column(column, justify="left" if column in ("quantity", "unit") else "right")
    for name, unit in UNITS.items():
        if f"{name}_mae" in metrics:
            table.add_row(labels[name], f"{metrics[f'{name}_mae']:.4g}", f"{metrics[f'{name}_rmse']:.4g}", unit)
    if "frequency_mae_cm" in metrics:
        table.add_row("harmonic frequencies", f"{metrics['frequency_mae_cm']:.4g}", "", "cm⁻¹")
    return table


def _by_type_table(by_type: dict[str, dict[str, Any]]):
    """MAE per config_type, one row each: the quantities the data label, in the units of the overall table."""
    from rich.table import Table

    from equiforce.train.metrics import UNITS

    labels = {"energy_per_atom": "E / atom", "forces": "F", "stress": "stress"}
    shown = [name for name in labels if any(f"{name}_mae" in m for m in by_type.values())]
    table = Table(title="MAE by config_type")
    table.add_column("config_type")
    table.add_column("structures", justify="right")
    for name in shown:
        table.add_column(f"{labels[name]} ({UNITS[name]})", justify="right")
    for config_type, metrics in by_type.items():
        cells = [f"{metrics[f'{name}_mae']:.4g}" if f"{name}_mae" in metrics else "" for name in shown]
        table.add_row(config_type, str(metrics["n_configs"]), *cells)
    return table


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _other_rank() -> bool:
    """True on ranks other than 0 of a torchrun job: they trained their share and print nothing."""
    from equiforce.train.distributed import joined

    return not joined().main


def cmd_train(args: argparse.Namespace) -> int:
    from equiforce.train.config import load_config
    from equiforce.train.trainer import train

    config = load_config(args.config)
    result = train(config, progress=False if args.no_progress else None)
    if _other_rank():
        return 0
    console = _console()
    if "uq_method" in result:  # a fine-tuned model with uncertainty: its members/backbone, then the σ recalibrated
        epochs = ", ".join(f"{p['best_epoch']} of {p['epochs']}" for p in result["parts"])
        console.print(f"fine-tuned {result['uq_method']} model, recalibrated (best epochs {epochs}); "
                      f"model: {result['best_model']}")
    else:
        console.print(f"best epoch {result['best_epoch']} of {result['epochs']}; model: {result['best_model']}")
    if result.get("valid"):
        console.print(_metrics_table("validation (best model)", result["valid"]))
    if result.get("test"):
        console.print(_metrics_table("test (best model)", result["test"]))
    if result.get("forgetting"):  # fine-tuning with replay: the old data's errors before and after
        forgetting = result["forgetting"]
        console.print(_metrics_table("replay hold-out before fine-tuning (forgetting)", forgetting["before"]))
        console.print(_metrics_table("replay hold-out after fine-tuning (forgetting)", forgetting["after"]))
    if "added_elements" in result:  # fine-tuned: its report beside the model
        from equiforce.train.finetune import FINETUNE_REPORT

        console.print(f"wrote {Path(config.output.directory) / FINETUNE_REPORT}")
    return 0


def _check_eval_labels(configs: Sequence[Any], args: argparse.Namespace) -> None:
    """Errors need labels: none under any key is a mistyped key, not an evaluation with nothing to report."""
    from equiforce.data import keys as K
    from equiforce.data.io import label_names
    from equiforce.data.packed import GraphStore
    from equiforce.errors import DataError

    def found(name: str) -> bool:
        if isinstance(configs, GraphStore):  # from the pack's summary
            flags = {"energy": K.HAS_ENERGY, "forces": K.HAS_FORCES, "stress": K.HAS_STRESS, "hessian": K.HAS_HESSIAN}
            return configs.labelled(flags[name])
        return any(getattr(c, name) is not None for c in configs)

    if any(found(name) for name in ("energy", "forces", "stress", "hessian")):
        if not found("forces"):
            _console().print(f"[yellow]note:[/] no forces under --forces-key '{args.forces_key}' in {args.data}; "
                             "energies only")
        return
    names = label_names(args.data, args.format)
    raise DataError(f"no structure has a label under --energy-key '{args.energy_key}', --forces-key "
                    f"'{args.forces_key}', --stress-key '{args.stress_key}' or --virial-key '{args.virial_key}' "
                    f"(the first frame carries {names})", source=str(args.data))


def cmd_eval(args: argparse.Namespace) -> int:
    from equiforce.data.io import open_pack, read_configurations
    from equiforce.data.packed import is_pack
    from equiforce.evaluate import evaluate, parity_plot, resolve_device
    from equiforce.models.file import load_model
    from equiforce.utils.atomic_io import atomic_write_json
    from equiforce.utils.paths import check_output_directory

    device = resolve_device(args.device)
    out = Path(args.out) if args.out is not None else Path(args.model).resolve().parent
    check_output_directory(out, "--out")  # before the evaluation: an unusable --out is said before any work
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, device=device)
    keys = dict(energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key,
                virial_key=args.virial_key, hessian_key=args.hessian_key)
    if is_pack(args.data):  # left on disk and read batch by batch: a test set larger than memory is evaluated
        configs = open_pack(args.data, args.index, keys)
    else:
        configs = read_configurations(args.data, **keys, index=args.index, require_energy=False, format=args.format)
    _check_eval_labels(configs, args)
    collector = None
    if args.uq:  # σ gathered in the same pass as the errors
        from equiforce.uq.predict import UQCollector
        from equiforce.uq.report import require_uncertainty

        require_uncertainty(model)
        collector = UQCollector()
    result = evaluate(model, configs, batch_size=args.batch_size, device=device, keep_values=True,
                      by_config_type=True, observers=[collector] if collector is not None else [])
    values = result.pop("values")
    every = result.pop("values_every", {})
    by_type = result.pop("by_config_type", {})
    parity_plot({k: v[0] for k, v in values.items()}, {k: v[1] for k, v in values.items()}, out / "parity.png",
                title=f"{Path(args.model).name} on {Path(args.data).name}", metrics=result, every=every)
    from equiforce.train.metrics import UNITS

    report = {"model": str(args.model), "data": str(args.data), "metrics": result, "units": UNITS}
    if by_type:
        report["by_config_type"] = by_type
    atomic_write_json(out / "metrics.json", report)
    console = _console()
    console.print(_metrics_table(f"{Path(args.data).name}: {result['n_configs']} structures, "
                                 f"{result['n_atoms']} atoms", result))
    if by_type:
        console.print(_by_type_table(by_type))
    console.print(f"wrote {out / 'metrics.json'} and {out / 'parity.png'}")
    if args.uq:
        from equiforce.uq.report import evaluate_uncertainty, uq_table

        report["uq"] = evaluate_uncertainty(model, configs, out, batch_size=args.batch_size, device=device,
                                            title=f"{Path(args.model).name} on {Path(args.data).name}",
                                            predictions=collector.result())
        atomic_write_json(out / "metrics.json", report)
        console.print(uq_table("uncertainty", report["uq"]))
        console.print(f"wrote {report['uq']['plots']['calibration']} and {report['uq']['plots']['error_vs_sigma']}")
    return 0


def cmd_train_uq(args: argparse.Namespace) -> int:
    from equiforce.uq.config import load_uq_config
    from equiforce.uq.report import uq_table
    from equiforce.uq.train import train_uq

    result = train_uq(load_uq_config(args.config), progress=False if args.no_progress else None)
    if _other_rank():
        return 0
    console = _console()
    console.print(f"{result['method']} model with calibrated uncertainty: {result['model']}")
    console.print(uq_table("validation (calibration set)", result["valid"]))
    if result.get("test"):
        console.print(uq_table("test", result["test"]))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    import numpy as np
    from ase.data import chemical_symbols
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from equiforce.data import keys as K
    from equiforce.data.io import label_names
    from equiforce.data.packed import PROGRESS, READER_DEFAULTS, GraphStore, pack
    from equiforce.errors import EquiforceError

    reader = {key: getattr(args, key) for key in READER_DEFAULTS}
    console = _console()
    if (Path(args.out) / PROGRESS).is_file():
        console.print(f"resuming the unfinished pack in {args.out}")
    columns = (SpinnerColumn(), TextColumn("packing: {task.completed} structures"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=args.no_progress, transient=True) as bar:
            task = bar.add_task("pack", total=None)
            index = pack(args.data, args.out, cutoff=args.cutoff, reader=reader, dtype=args.dtype,
                         shard_mb=args.shard_mb, overwrite=args.overwrite,
                         progress=lambda n: bar.update(task, completed=n))
    except EquiforceError:
        if (Path(args.out) / PROGRESS).is_file():  # the shards written so far are kept
            print(f"note: {args.out} keeps the shards packed so far: the same command resumes after them; after "
                  "changing the inputs, add --overwrite", file=sys.stderr)
        raise
    size = sum(s["bytes"] for s in index["shards"]) + index["summary_bytes"]
    console.print(f"packed {index['structures']} structures ({index['atoms']} atoms, {index['edges']} edges within "
                  f"{index['cutoff']:g} Å) into {args.out}: {len(index['shards'])} shard(s), {size / 1e6:.1f} MB; "
                  f"elements {' '.join(chemical_symbols[z] for z in index['elements'])}")
    # every packed structure has an energy (a frame without one is refused, as for training); forces may be missing
    without = int(np.count_nonzero(GraphStore.open(args.out).column(K.HAS_FORCES) == 0))
    if without:
        names = label_names(args.data[0], args.format)
        console.print(f"[yellow]note:[/] {without} of {index['structures']} structures have no forces under "
                      f"'{args.forces_key}' (the first frame of {args.data[0]} carries {names})")
    console.print(f"train on it with `data.train: {args.out}` (or data.valid, data.test; model.cutoff "
                  f"{index['cutoff']:g} Å or less)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from equiforce.demo.main import run_demo
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("equiforce"):
            raise EquiforceError("the demo is not available in this installation") from None
        raise
    kwargs: dict[str, Any] = {"system": args.system}
    if args.minutes is not None:
        kwargs["minutes"] = args.minutes
    run_demo(args.out, **kwargs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from equiforce import __version__

    parser = argparse.ArgumentParser(prog="equiforce", description="Equivariant machine-learning potentials.")
    parser.add_argument("--version", action="version", version=f"equiforce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a potential from a YAML config")
    p.add_argument("config", help="YAML training configuration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="errors of a model on labelled structures, with a parity plot")
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("data", help="structures with reference labels (extxyz, ...)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", default=None, help="directory for parity.png and metrics.json (default: the "
                                               "model's directory)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--virial-key", default="virial")
    p.add_argument("--hessian-key", default="hessian",
                   help="per-atom array [N, 9N] or info entry [3N, 3N] with Hessian labels (eV/Å²): full model "
                        "Hessians are then compared entry by entry and by harmonic frequency")
    p.add_argument("--index", default=":", help="frames to read, ase slice syntax (default all)")
    p.add_argument("--format", default=None, help="file format for ase.io (e.g. extxyz) where the file name does "
                                                  "not say it")
    p.add_argument("--uq", action="store_true", help="also rate the model's uncertainty: Spearman, miscalibration "
                                                     "area, NLL, calibration.png and error_vs_sigma.png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-uq", aliases=["train-ensemble"],
                       help="train a model with calibrated uncertainty (ensemble or heads) from a YAML config")
    p.add_argument("config", help="YAML config: the sections of `train` plus `uq` (see docs/uncertainty.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=cmd_train_uq)

    p = sub.add_parser("pack", help="build the graphs of large data sets once and store them for streamed training")
    p.add_argument("data", nargs="+", help="structure files (extxyz, npz, ASE db, any ase.io format), packed in order")
    p.add_argument("--out", required=True,
                   help="directory of the pack, new or empty (give it as data.train, data.valid or data.test)")
    p.add_argument("--cutoff", type=positive_float, required=True,
                   help="neighbour cutoff in Å: the largest model cutoff the pack will serve")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="storage precision of positions and labels (default float64; float32 halves the size)")
    p.add_argument("--shard-mb", type=positive_float, default=256.0, help="size of each shard file (default 256 MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished pack in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    for key, default in (("energy", "energy"), ("forces", "forces"), ("stress", "stress"), ("virial", "virial"),
                         ("config-type", "config_type"), ("weight", "config_weight"), ("hessian", "hessian")):
        p.add_argument(f"--{key}-key", default=default, help=f"label key (default {default})")
    p.add_argument("--format", default=None, help="file format for ase.io where the file name does not say it")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("demo", help="train and simulate a small system end to end")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--system", default="ethanol", help="ethanol (default: active learning with GFN2-xTB) or cu-ni "
                                                       "(EMT data set, training, MD)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="time budget (ethanol: of the learning loop; cu-ni: of training)")
    p.set_defaults(func=cmd_demo)

    from equiforce.active.cli import add_parser as add_learn_parser
    from equiforce.sim.cli_md import add_parser as add_sim_parsers

    add_learn_parser(sub)
    add_sim_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    default_format = warnings.formatwarning
    warnings.formatwarning = _format_warning  # equiforce's own warnings as one line, like its errors
    try:
        return args.func(args)
    except EquiforceError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a path that cannot be read or written (an --out that is a file, a full disk, ...)
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: train, train-uq and learn continue from their last checkpoint when rerun, pack from its "
              "last shard, md from its last checkpoint with --resume if it was started with --checkpoint-every",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = default_format


_PACKAGE = Path(__file__).resolve().parent
_default_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: MESSAGE`` for equiforce's own warnings (what to do is in the message; the source line printed
    by Python's default format is noise to a user); other libraries' warnings keep Python's format."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours and issubclass(category, UserWarning):
        return f"warning: {' '.join(str(message).split())}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


if __name__ == "__main__":
    sys.exit(main())

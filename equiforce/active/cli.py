"""``equiforce learn CONFIG.yaml`` / ``equiforce learn --resume DIR`` / ``equiforce learn --report DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from equiforce.errors import ConfigError


def cmd_learn(args: argparse.Namespace) -> int:
    from equiforce.active.config import load_learn_config
    from equiforce.active.loop import learn

    progress = False if args.no_progress else None
    if args.report is not None:
        from equiforce.active.journal import JOURNAL, read_journal
        from equiforce.active.loop import CONFIG
        from equiforce.active.report import write_report

        if args.config is not None or args.resume is not None:
            raise ConfigError("--report DIR takes no CONFIG or --resume: it reports the run kept in DIR")
        directory = Path(args.report)
        if not (directory / JOURNAL).exists():
            raise ConfigError(f"{directory} has no {JOURNAL}: not an equiforce learn run directory")
        # the config the run kept (oracle name etc. for report.md); a run directory without one still reports
        kept = load_learn_config(directory / CONFIG) if (directory / CONFIG).exists() else None
        summary = write_report(directory, read_journal(directory / JOURNAL), kept)
    elif args.resume is not None:
        if args.config is not None:
            raise ConfigError("give either CONFIG or --resume DIR (a resumed run uses the config kept in DIR)")
        summary = learn(resume=args.resume, progress=progress)
        directory = Path(args.resume)
    elif args.config is not None:
        summary = learn(load_learn_config(args.config), config_path=args.config, progress=progress)
        directory = Path(load_learn_config(args.config).directory)
    else:
        raise ConfigError("give a config file (equiforce learn CONFIG.yaml) or --resume DIR")
    _print(summary, directory)
    return 0


def _print(summary: dict[str, Any], directory: Path) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"{summary['oracle_calls']} oracle calls ({summary['labels']} labels); "
                  f"{summary['stopped'] or 'not finished'}")
    console.print(f"report: {directory / 'report.md'}; model: {directory / 'model.eqf'}")


def add_parser(subparsers: Any) -> None:
    """Register ``learn`` on the main CLI's sub-parsers."""
    p = subparsers.add_parser("learn", help="active learning with a quantum (or any ASE) oracle from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (see docs/active_learning.md)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR (never repeats a finished "
                                                                 "oracle call)")
    p.add_argument("--report", metavar="DIR", default=None, help="only rebuild DIR's report from its journal")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_learn)

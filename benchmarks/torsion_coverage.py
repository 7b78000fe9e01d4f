"""Which conformers an active-learning run labelled, round by round, against a test set: one dihedral's histogram.

    python benchmarks/torsion_coverage.py RUN_DIR TEST.xyz [--atoms 3 2 1 0] [--bins 0 30 90 150 180]

Reads the run's journal (every structure selected for the oracle, with its round) and the test frames, and
prints how many fall in each bin of |dihedral| (degrees) for the four atoms given (default: ethanol from
``ase.build``, H–O–C–C: *gauche* near 60°, *trans* near 180°).  Why: a loop that starts from one conformer
and explores with MD of an early model may never cross a torsional barrier that oracle MD crosses at once;
this shows whether the picks cover the conformers the test set holds (docs/benchmarks.md, active-learning
section, eighth and ninth runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from ase.io import read

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equiforce.active.journal import JOURNAL, read_journal  # noqa: E402
from equiforce.active.torsions import dihedral  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402


def histogram(frames: list[np.ndarray], atoms: list[int], bins: list[float]) -> list[int]:
    values = [abs(dihedral(p, *atoms)) for p in frames]
    return np.histogram(values, bins=bins)[0].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an `equiforce learn` run directory (with journal.jsonl)")
    parser.add_argument("test", type=Path, help="test frames (any ase.io format)")
    parser.add_argument("--atoms", type=int, nargs=4, default=[3, 2, 1, 0], help="dihedral atoms (default H-O-C-C "
                                                                                  "of ase.build's ethanol)")
    parser.add_argument("--bins", type=float, nargs="+", default=[0, 30, 90, 150, 180], help="|dihedral| bin edges")
    args = parser.parse_args(argv)
    if not (args.run / JOURNAL).is_file():
        parser.error(f"{args.run}: no {JOURNAL} (not an `equiforce learn` run directory)")
    if not args.test.is_file():
        parser.error(f"{args.test}: not a file of test frames")
    bins = list(args.bins[:-1]) + [args.bins[-1] + 1e-9]
    by_round: dict[int, list[np.ndarray]] = {}
    for record in read_journal(args.run / JOURNAL):
        if record["type"] == "selected":
            by_round.setdefault(int(record["round"]), []).extend(
                np.asarray(item["atoms"]["positions"], dtype=float) for item in record["items"])
    test = [a.positions for a in read(args.test, ":")]
    labels = [f"{lo:g}–{hi:g}°" for lo, hi in zip(args.bins[:-1], args.bins[1:])]
    print(f"{'':<10} {'frames':>6} " + " ".join(f"{x:>9}" for x in labels))
    rows = [("test", test)] + [(f"round {r}", frames) for r, frames in sorted(by_round.items())]
    for name, frames in rows:
        print(f"{name:<10} {len(frames):>6} " + " ".join(f"{n:>9}" for n in histogram(frames, args.atoms, bins)))
    return 0


if __name__ == "__main__":
    run_script(main)

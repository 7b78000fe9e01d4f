"""Does training time decide the active-vs-random comparison? Train finished rounds longer and rate them again.

    python benchmarks/al_training_limit.py --results runs/avr/results.json --seconds 240 \
        --al-rounds 4 --random-rounds 4 11 --out runs/avr/longer.json

Reads a finished ``benchmarks/active_vs_random.py`` run (its results JSON, whose settings name the work
directory and the oracle-MD cache): each named round of the loop (``al``) and of the random arm is trained
``--seconds`` more, warm-started from that round's model, on exactly that round's data and with the run's
training settings (each arm's ``round`` is 1-based, as in its curve), then the round's model and the longer-trained
one are rated on the run's test set.

Why: every round trains for a fixed wall-clock time, so a model made with few calls has had fewer seconds of
training than one made with 500.  ``calls_ratio`` compares the loop early in its run with random selection at
the end of its run; if longer training changed the ratio of those two errors, the benchmark would be measuring
the training budget instead of which structures were labelled.  Nothing here calls the oracle: the test set and
the pool are read back from the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from active_vs_random import oracle_sets, random_round_dir, random_round_frames  # noqa: E402

from equiforce.active.config import LearnConfig, parse_learn_config  # noqa: E402
from equiforce.active.journal import JOURNAL, read_journal  # noqa: E402
from equiforce.active.loop import RunState  # noqa: E402
from equiforce.active.rounds import MODEL, rate, train_round  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402


def run_settings(results_path: Path) -> tuple[dict[str, Any], argparse.Namespace]:
    """The finished run's results and its command-line settings (paths back to ``Path``)."""
    try:
        results = json.loads(results_path.read_text())
        args = argparse.Namespace(**results["settings"])
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{results_path}: not the results JSON of benchmarks/active_vs_random.py ({error})") from None
    args.workdir = Path(args.workdir)
    args.cache = None if args.cache is None else Path(args.cache)
    return results, args


def finished_run(results_path: Path, seconds: float | None = None
                 ) -> tuple[dict[str, Any], argparse.Namespace, LearnConfig, list[Configuration], list[Configuration]]:
    """A finished run read back: its results, settings, the loop's config (with ``seconds`` of training per round,
    default the run's), test set and random pool — never generated again."""
    results, args = run_settings(results_path)
    cfg = loop_config(args.workdir, args.round_time if seconds is None else seconds)
    try:
        test, _, pool = oracle_sets(args, generate=False)
    except FileNotFoundError as error:
        raise SystemExit(f"{error} (the run's test set and pool are read back, never made again)") from None
    return results, args, cfg, test, pool


def loop_config(workdir: Path, seconds: float) -> LearnConfig:
    """The loop's own config (``al/config.yaml``) with ``seconds`` of training per round."""
    path = workdir / "al" / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; --results must name a finished active_vs_random.py run")
    config = yaml.safe_load(path.read_text())
    config["training"]["max_time"] = seconds
    return parse_learn_config(config, str(path))


def round_data(arm: str, round_: int, args: argparse.Namespace, state: RunState, pool: list[Configuration],
               curve: list[dict[str, Any]], cfg: LearnConfig) -> tuple[list[Configuration], list[Configuration]]:
    """What the round's model was trained on: the loop's labels selected before it, or the random arm's frames."""
    if arm == "al":
        return state.labelled(round_, "train"), state.labelled(round_, "valid")
    calls = int(curve[round_ - 1]["calls"])
    return random_round_frames(pool, calls, args.seed, cfg.select.valid_fraction)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="results JSON of active_vs_random.py")
    parser.add_argument("--seconds", type=float, default=240.0, help="extra training per round (default %(default)s)")
    parser.add_argument("--al-rounds", type=int, nargs="*", default=[4], help="the loop's rounds (1-based)")
    parser.add_argument("--random-rounds", type=int, nargs="*", default=[4, 11], help="the random arm's rounds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    cli = build_parser().parse_args()
    torch.set_num_threads(cli.threads)
    results, args, cfg, test, pool = finished_run(cli.results, cli.seconds)
    state = RunState.replay(read_journal(args.workdir / "al" / JOURNAL))
    rows = []
    for arm, rounds in (("al", cli.al_rounds), ("random", cli.random_rounds)):
        curve = results[arm]
        for round_ in rounds:
            if not 1 <= round_ <= len(curve):
                raise SystemExit(f"--{arm}-rounds: {round_} is not a round of the {arm} arm "
                                 f"(1 to {len(curve)})")
            model = (args.workdir / "al" / "rounds" / f"r{round_:03d}" if arm == "al"
                     else random_round_dir(args.workdir, round_)) / MODEL
            if not model.is_file():
                raise SystemExit(f"{model}: missing; the {arm} arm's round {round_} did not finish in {args.workdir}")
            train, valid = round_data(arm, round_, args, state, pool, curve, cfg)
            t0 = time.perf_counter()
            longer = train_round(cli.out.parent / f"{cli.out.stem}_{arm}_r{round_:03d}", train, valid, cfg, model,
                                 cfg.seed + 1000 + round_, progress=False)
            row = {"arm": arm, "round": round_, "calls": int(curve[round_ - 1]["calls"]), "n_train": len(train),
                   "n_valid": len(valid), "f_mae_mev_a": rate(load_model(model), test)["forces_mae"],
                   "f_mae_longer_mev_a": rate(load_model(longer), test)["forces_mae"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{arm} round {round_} ({row['calls']} calls): {row['f_mae_mev_a']:.1f} -> "
                  f"{row['f_mae_longer_mev_a']:.1f} meV/Å", file=sys.stderr, flush=True)
    atomic_write_text(cli.out, json.dumps({"results": str(cli.results), "extra_seconds": cli.seconds, "rows": rows,
                                           "n_test": len(test)}, indent=2) + "\n")
    print(f"{'arm':>7} {'round':>5} {'calls':>6} {'F MAE':>8} {'+' + format(cli.seconds, 'g') + ' s':>10}")
    for row in rows:
        print(f"{row['arm']:>7} {row['round']:>5} {row['calls']:>6} {row['f_mae_mev_a']:>8.1f} "
              f"{row['f_mae_longer_mev_a']:>10.1f}")


if __name__ == "__main__":
    run_script(main)

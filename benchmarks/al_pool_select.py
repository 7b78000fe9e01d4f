"""Is it the selection or the exploration? The loop's selection applied to frames of oracle MD.

    python benchmarks/al_pool_select.py --results runs/avr/results.json --candidates 500 \
        --out runs/avr/pool_select.json

Reads a finished ``benchmarks/active_vs_random.py`` run (its results JSON) and adds an arm, ``pool_select``, that
sits between its two: the rounds of the random arm (same first round, same calls per round, the same warm-started
training of the same model for the same time), but each later round's frames are *chosen* by the loop's own
selection (its strategy, σ window, pool factor and random share, from the run's ``al/config.yaml``) from a
candidate pool of oracle-MD frames at 300/500/800 K — separate trajectories from the test set and from the random
arm's pool, ``--candidates`` frames per temperature, generated once and cached beside them.  Like the random arm's
pool, the candidates' MD is not counted as oracle calls: each chosen frame counts as one.

Why: the loop explores with its own early models and labels what it finds there; the random arm samples the test
set's own distribution.  With candidates from that distribution, the selection alone decides: if it reaches random
selection's error at ``--max-calls`` with far fewer calls than the loop does, the loop's exploration is what holds
it back; if not, the selection is.  ``--strategy`` and ``--random-fraction`` replace the loop's selection
settings; ``true_error`` and ``true_error_fps`` rank the candidates by their actual largest atomic force error
instead of σ (their labels are known here) — what a perfect uncertainty estimate would pick, a bound on what
ranking by σ can reach.  ``--candidate-temperatures`` keeps only the candidates of some temperatures (e.g.
``800 --strategy random``: random frames of the hottest MD only).

Round 1 is the random arm's round 1 (its model is reused: the same frames and training).  A rerun reuses
finished rounds (``ROUND/picks.json`` and ``ROUND/model.eqf`` under ``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from active_vs_random import calls_to_reach, random_round_dir, random_round_frames  # noqa: E402
from al_training_limit import finished_run  # noqa: E402

from equiforce.active.config import LearnConfig  # noqa: E402
from equiforce.active.explore import evaluate_candidates  # noqa: E402
from equiforce.active.loop import validation_split  # noqa: E402
from equiforce.active.reference import cached_md_set  # noqa: E402
from equiforce.active.rounds import MODEL, rate, train_round  # noqa: E402
from equiforce.active.select import select  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.demo.ethanol import ORACLE  # noqa: E402
from equiforce.evaluate import evaluate  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

TEMPERATURES = [300.0, 500.0, 800.0]


def candidate_pool(args: argparse.Namespace, per_temperature: int) -> list[Configuration]:
    """Oracle MD frames for the selection to choose from: the random arm's recipe with a seed of its own."""
    from ase.build import molecule

    cache = args.cache or args.workdir / "cache"
    frames, _ = cached_md_set(cache, molecule(args.molecule), ORACLE, TEMPERATURES, per_temperature, interval=40,
                              equilibration=200, seed=args.seed + 303)
    return frames


TRUE_ERROR = {"true_error": "uncertainty", "true_error_fps": "uncertainty_fps"}
"""Strategies that rank by the actual error instead of σ (the labels of the candidates are known here): the ranking a
perfect uncertainty estimate would give, the best that ranking by σ could do."""


def choose(model_path: Path, candidates: list[Configuration], available: np.ndarray, train: list[Configuration],
           valid: list[Configuration], n: int, cfg: LearnConfig, rng: np.random.Generator) -> list[int]:
    """The loop's selection (``select.*`` of ``cfg``) among the available candidates; pool indices.

    With ``select.strategy`` one of :data:`TRUE_ERROR`, each candidate's largest atomic force error takes the place
    of its σ, without a σ window."""
    model = load_model(model_path)
    index = np.flatnonzero(available)
    found, predicted = evaluate_candidates(model, [candidates[i].to_atoms() for i in index])
    s = cfg.select
    training = evaluate_candidates(model, [c.to_atoms() for c in train])[0].descriptors
    if s.strategy in TRUE_ERROR:
        found.sigma = np.array([np.linalg.norm(f - candidates[i].forces, axis=-1).max()
                                for f, i in zip(predicted, index)])
        strategy, sigma_min, sigma_max = TRUE_ERROR[s.strategy], 0.0, np.inf
    else:
        reference = rate(model, valid)["median_max_force_sigma"] if valid else 0.0
        strategy, sigma_min = s.strategy, s.sigma_min_factor * reference
        sigma_max = s.sigma_max_factor * reference if reference > 0 else np.inf
    picks = select(found, n, strategy, training=training, sigma_min=sigma_min, sigma_max=sigma_max,
                   min_distance=s.min_distance, pool_factor=s.pool_factor, rng=rng,
                   random_fraction=s.random_fraction)
    return [int(index[i]) for i in picks]


def pool_select_arm(args: argparse.Namespace, results: dict[str, Any], cfg: LearnConfig, test: list[Configuration],
                    pool: list[Configuration], candidates: list[Configuration], max_calls: int, workdir: Path
                    ) -> list[dict[str, Any]]:
    """Rounds of the random arm's sizes whose new frames the loop's selection picks from ``candidates``."""
    first_calls = int(results["random"][0]["calls"])
    train, valid = random_round_frames(pool, first_calls, args.seed, cfg.select.valid_fraction)
    previous = random_round_dir(args.workdir, 1) / MODEL
    if not previous.is_file():
        raise SystemExit(f"{previous}: missing; the random arm's first round did not finish in {args.workdir}")
    available = np.ones(len(candidates), dtype=bool)
    calls, curve = first_calls, []
    rng = np.random.default_rng(args.seed + 7)
    for round_ in range(1, 10_000):
        if round_ > 1:
            n = min(args.per_round, max_calls - calls)
            directory = workdir / f"r{round_:03d}"
            record = directory / "picks.json"
            if record.is_file() and (directory / MODEL).is_file():
                picks = json.loads(record.read_text())["picks"]
            else:
                picks = choose(previous, candidates, available, train, valid, n, cfg, rng)
                if not picks:
                    print(f"round {round_}: nothing left to pick", file=sys.stderr)
                    break
            splits = validation_split(len(picks), cfg.select.valid_fraction, cfg.seed, round_)  # as the loop's
            train = train + [candidates[i] for i, s in zip(picks, splits) if s == "train"]
            valid = valid + [candidates[i] for i, s in zip(picks, splits) if s == "valid"]
            available[picks] = False
            calls += len(picks)
            if not (directory / MODEL).is_file():
                atomic_write_text(record, json.dumps({"picks": picks}) + "\n")
                train_round(directory, train, valid, cfg, previous, cfg.seed + round_, progress=False)
            previous = directory / MODEL
        metrics = evaluate(load_model(previous), test, batch_size=50, by_config_type=True)
        by_t = {k: v["forces_mae"] for k, v in metrics.get("by_config_type", {}).items()}
        picked_t = Counter(c.config_type for c in [*train, *valid])
        curve.append({"calls": calls, "f_mae_mev_a": metrics["forces_mae"], "round": round_,
                      "f_mae_by_temperature": by_t, "frames_by_temperature": dict(picked_t)})
        print(f"pool_select: {calls} calls, test force MAE {metrics['forces_mae']:.1f} meV/Å "
              f"({', '.join(f'{k} {v:.1f}' for k, v in sorted(by_t.items()))})", file=sys.stderr, flush=True)
        if calls >= max_calls:
            break
    return curve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="results JSON of active_vs_random.py")
    parser.add_argument("--candidates", type=int, default=500,
                        help="candidate oracle-MD frames per temperature (default %(default)s)")
    parser.add_argument("--candidate-temperatures", type=float, nargs="+", default=None, metavar="K",
                        choices=TEMPERATURES, help="choose only among candidates from MD at these temperatures "
                                                   "(default: all of 300, 500 and 800 K)")
    parser.add_argument("--max-calls", type=int, default=None, help="stop here (default: the run's --max-calls)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: RUN_WORKDIR/pool_select")
    parser.add_argument("--strategy", default=None,
                        choices=["uncertainty_fps", "uncertainty", "fps", "random", *TRUE_ERROR],
                        help="the selection (default: the loop's select.strategy); true_error and true_error_fps "
                             "rank by the actual force error instead of σ")
    parser.add_argument("--random-fraction", type=float, default=None,
                        help="share of each round's picks drawn at random (default: the loop's select.random_fraction)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    cli = build_parser().parse_args()
    torch.set_num_threads(cli.threads)
    results, args, cfg, test, pool = finished_run(cli.results)
    changes = {"strategy": cli.strategy, "random_fraction": cli.random_fraction}
    cfg = cfg.model_copy(update={"select": cfg.select.model_copy(
        update={k: v for k, v in changes.items() if v is not None})})
    t0 = time.perf_counter()
    candidates = candidate_pool(args, cli.candidates)
    if cli.candidate_temperatures:
        wanted = {f"md{k:g}K" for k in cli.candidate_temperatures}
        candidates = [c for c in candidates if c.config_type in wanted]
    t_data = time.perf_counter() - t0
    max_calls = cli.max_calls or args.max_calls
    workdir = cli.workdir or args.workdir / "pool_select"
    curve = pool_select_arm(args, results, cfg, test, pool, candidates, max_calls, workdir)
    target = results["random_mae_at_max_calls"]
    needed = calls_to_reach(curve, target)
    out = {"results": str(cli.results), "pool_select": curve, "al": results["al"], "random": results["random"],
           "random_mae_at_max_calls": target, "pool_select_calls_to_reach": needed,
           "pool_select_calls_ratio": None if needed is None else needed / args.max_calls,
           "al_calls_ratio": results["calls_ratio"], "n_candidates": len(candidates), "n_test": len(test),
           "candidate_temperatures": cli.candidate_temperatures,
           "selection": cfg.select.model_dump(), "seconds": {"candidates": t_data,
                                                             "arm": time.perf_counter() - t0 - t_data}}
    atomic_write_text(cli.out, json.dumps(out, indent=2) + "\n")
    al = {int(p["calls"]): p["f_mae_mev_a"] for p in results["al"]}
    rnd = {int(p["calls"]): p["f_mae_mev_a"] for p in results["random"]}
    print(f"{'calls':>6} {'pool_select':>12} {'random':>8} | {'AL calls':>8} {'AL':>6}")
    for k, p in enumerate(curve):
        a = results["al"][k] if k < len(results["al"]) else None
        r = rnd.get(int(p["calls"]))
        print(f"{p['calls']:>6} {p['f_mae_mev_a']:>12.1f} {'' if r is None else format(r, '.1f'):>8} | "
              f"{'' if a is None else a['calls']:>8} {'' if a is None else format(al[int(a['calls'])], '.1f'):>6}")
    reached = ("never reaches it" if needed is None
               else f"reaches it at {needed:.0f} calls, ratio {needed / args.max_calls:.2f}")
    loop = results["calls_ratio"]
    print(f"random at {args.max_calls} calls: {target:.1f} meV/Å; pool_select {reached} "
          f"(the loop: {'never' if loop is None else format(loop, '.2f')})")


if __name__ == "__main__":
    run_script(main)

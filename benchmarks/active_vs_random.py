"""Active learning vs random selection of MD frames: test force MAE against the number of oracle calls.

    python benchmarks/active_vs_random.py --out results.json --max-calls 500 --per-round 50 \
        --round-time 60 --cache runs/active_vs_random/cache

Same oracle (GFN2-xTB via tblite), same molecule (ethanol by default; ``--molecule`` takes any name of
``ase.build.molecule``, e.g. ``trans-butane``), same model, same training schedule for both arms:

* **test set**: frames from oracle-driven Langevin MD at 300, 500 and 800 K (``--test-frames`` per
  temperature), generated once and cached (extxyz, keyed by every parameter);
* **al**: ``equiforce learn`` with the demo's settings (bootstrap of rattled copies of one geometry, then
  rounds of batched model MD at 300/500/800 K: half of each round's picks random MD snapshots, half by
  uncertainty + FPS), ``--per-round`` calls per round, until ``--max-calls``;
* **random**: the same rounds (same bootstrap size, same calls per round, same warm-started training of
  the same uncertainty-aware model for the same time per round), but each round's new structures are
  drawn at random from a pool of oracle-MD frames at 300–800 K (separate trajectories from the test set).
  The pool's MD is not counted as oracle calls — the usual convention for "random frames of an ab-initio
  trajectory" baselines (it would cost thousands more calls to make).

``--explore-random`` adds a third arm, ``explore_random``: the loop itself with ``select.strategy: random``
(its own exploration, its picks drawn at random from what it explored). Against ``al`` it measures what the
uncertainty + diversity selection adds; against ``random`` what the loop's exploration costs or gains over
frames of oracle MD.

``--optimizer``, ``--weight-decay`` and ``--weight-decay-on`` set both arms' optimiser (default: the loop's own,
Adam without decay; AdamW decay 5e-3 on the interactions was measured not to help here, docs/benchmarks.md);
``--loss`` and ``--huber-delta`` their penalty (default: the loop's own, Huber with delta 0.01 since the seventh run
in docs/benchmarks.md; ``--loss mse`` gives the earlier runs' training).
``--start-rattle`` sets the loop's rattled bootstrap copies, ``--start-torsions`` and ``--explore-torsions`` its
torsional moves (``start.torsions``, ``explore.torsions``: copies of the molecule with rotatable bonds turned to
random angles), ``--restart-from`` which labelled structures start its exploration MD (``explore.restart_from``),
``--explore-temperatures``, ``--explore-replicas`` and ``--explore-steps`` its MD ladder and how much MD
it runs per round (so how many candidates its selection chooses from), ``--random-fraction`` the share of its picks
drawn at random from its MD snapshots;
each defaults to the loop's own.

Every call (validation share and failures included) counts.  ``calls_ratio``: random selection's test MAE
at ``--max-calls`` calls is the target (interpolated log–log when the random curve has no point exactly
there); the calls active learning needs to reach it are found at the first point of its curve at or below
the target, by linear interpolation of log(MAE) against log(calls) with the point before; divided by
``--max-calls``.  ``null`` when active learning never reaches the target.  ``--reference-frames 1000``
also trains a model from scratch on that many random pool frames (``--reference-time`` s) for the demo's
"within 2× of 1,000 random frames" comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmd17 import add_optimizer_args, add_penalty_args  # noqa: E402

from equiforce.active.config import ExploreConfig, parse_learn_config  # noqa: E402
from equiforce.active.loop import learn  # noqa: E402
from equiforce.active.reference import cached_md_set  # noqa: E402
from equiforce.active.rounds import MODEL, rate, train_round  # noqa: E402
from equiforce.data.structure import Configuration  # noqa: E402
from equiforce.demo.ethanol import ORACLE, demo_settings, learn_config, train_reference  # noqa: E402
from equiforce.models.file import load_model  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_text  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402


def interpolate_mae(curve: list[dict[str, float]], calls: float) -> float:
    """MAE at ``calls`` on a curve (log–log linear between neighbours; the end value beyond the ends)."""
    xs = np.array([p["calls"] for p in curve], dtype=float)
    ys = np.array([p["f_mae_mev_a"] for p in curve], dtype=float)
    order = np.argsort(xs)
    return float(np.exp(np.interp(np.log(calls), np.log(xs[order]), np.log(ys[order]))))


def calls_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """First crossing of ``target`` along the curve (by calls), interpolated log–log; None if never."""
    points = sorted((p["calls"], p["f_mae_mev_a"]) for p in curve)
    for k, (x, y) in enumerate(points):
        if y <= target:
            if k == 0:
                return float(x)
            x0, y0 = points[k - 1]
            t = (math.log(target) - math.log(y0)) / (math.log(y) - math.log(y0))
            return float(math.exp(math.log(x0) + t * (math.log(x) - math.log(x0))))
    return None


def arm_config(args: argparse.Namespace, test_path: Path) -> dict[str, Any]:
    """The demo's learn config with this benchmark's training time per round and optimiser settings."""
    config = learn_config(args.workdir, test_path, loop_minutes=1e6, seed=args.seed, progress=False)
    config["training"].update(max_time=args.round_time, optimizer=args.optimizer, weight_decay=args.weight_decay,
                              weight_decay_on=args.weight_decay_on, loss=args.loss, huber_delta=args.huber_delta)
    config["first_round_max_time"] = args.first_round_time
    config["start"].update(structures=[f"molecule:{args.molecule}"], rattle=args.start_rattle,
                           torsions=args.start_torsions)
    config["explore"].update(torsions=args.explore_torsions, restart_from=args.restart_from,
                             temperatures=args.explore_temperatures, replicas=args.explore_replicas,
                             steps=args.explore_steps)
    config["select"].update(random_fraction=args.random_fraction)
    return config


def active_arm(args: argparse.Namespace, test_path: Path, name: str = "al",
               strategy: str | None = None) -> list[dict[str, float]]:
    """The loop with the demo's settings; ``strategy`` replaces its selection (e.g. "random")."""
    config = arm_config(args, test_path)
    config["directory"] = str(args.workdir / name)
    config["select"]["per_round"] = args.per_round
    if strategy is not None:
        config["select"]["strategy"] = strategy
    config["stop"].update(max_oracle_calls=args.max_calls, wall_time=None, max_rounds=1000)
    summary = learn(parse_learn_config(config, "active_vs_random"), progress=False)
    return [{"calls": r["calls"], "f_mae_mev_a": r["test_f_mae"], "round": r["round"]} for r in summary["rounds"]]


def random_round_dir(workdir: Path, round_: int) -> Path:
    """Where the random arm's round ``round_`` (1-based) trains and keeps its model."""
    return workdir / "random" / f"r{round_:03d}"


def random_round_frames(pool: list[Configuration], n: int, seed: int,
                        valid_fraction: float) -> tuple[list[Configuration], list[Configuration]]:
    """The random arm's training and validation frames once it has made ``n`` calls: the first ``n`` of one fixed
    permutation of the pool (so each round keeps the earlier rounds' frames), every k-th held out."""
    order = np.random.default_rng(seed + 1).permutation(len(pool))
    chosen = [pool[i] for i in order[:n]]
    valid_every = int(round(1 / valid_fraction))
    valid = [c for k, c in enumerate(chosen) if k % valid_every == valid_every - 1]
    train = [c for k, c in enumerate(chosen) if k % valid_every != valid_every - 1]
    return train, valid


def random_arm(args: argparse.Namespace, test: list[Configuration], pool: list[Configuration], bootstrap: int,
               test_path: Path) -> list[dict[str, float]]:
    """The loop's rounds with random pool frames instead of selection (same sizes, training and model)."""
    cfg = parse_learn_config(arm_config(args, test_path), "active_vs_random (random arm)")
    sizes = [bootstrap]
    while sizes[-1] < args.max_calls:
        sizes.append(min(args.max_calls, sizes[-1] + args.per_round))
    if sizes[-1] > len(pool):
        raise SystemExit(f"the pool has {len(pool)} frames; {sizes[-1]} are needed (raise --pool-frames)")
    curve, previous = [], None
    for round_, n in enumerate(sizes, 1):
        train, valid = random_round_frames(pool, n, args.seed, cfg.select.valid_fraction)
        directory = random_round_dir(args.workdir, round_)
        path = directory / MODEL
        if not path.exists():  # rerunning the benchmark reuses finished rounds
            path = train_round(directory, train, valid, cfg, previous, cfg.seed + round_, progress=False)
        previous = path
        metrics = rate(load_model(path), test)
        curve.append({"calls": n, "f_mae_mev_a": metrics["forces_mae"], "round": round_})
        print(f"random: {n} calls, test force MAE {metrics['forces_mae']:.1f} meV/Å", file=sys.stderr, flush=True)
    return curve


def reference_model(args: argparse.Namespace, test: list[Configuration], pool: list[Configuration]) -> dict[str, Any]:
    """A model trained from scratch on ``--reference-frames`` random pool frames."""
    from equiforce.evaluate import evaluate

    frames = [pool[i] for i in np.random.default_rng(args.seed + 2).permutation(len(pool))[:args.reference_frames]]
    result = train_reference(frames, args.workdir / "reference", args.reference_time, args.seed)
    metrics = evaluate(load_model(result["best_model"]), test, device="cpu")
    return {"frames": len(frames), "training_s": args.reference_time, "f_mae_mev_a": metrics["forces_mae"],
            "epochs": result["epochs"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("runs/active_vs_random"))
    parser.add_argument("--cache", type=Path, default=None, help="cache of oracle MD sets (default WORKDIR/cache)")
    parser.add_argument("--max-calls", type=int, default=500)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--round-time", type=float, default=60.0, help="training seconds per round (both arms)")
    parser.add_argument("--first-round-time", type=float, default=90.0)
    parser.add_argument("--test-frames", type=int, default=50, help="per temperature (300, 500, 800 K)")
    parser.add_argument("--pool-frames", type=int, default=200, help="per temperature, for the random arm")
    parser.add_argument("--reference-frames", type=int, default=0, help="also train on this many random frames")
    parser.add_argument("--reference-time", type=float, default=600.0)
    parser.add_argument("--molecule", default="CH3CH2OH",
                        help="the loop's starting structure and the oracle MD's, a name of ase.build.molecule "
                             "(default %(default)s, ethanol; cache files are keyed by the structure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    # the loop's own optimiser unless asked otherwise: read from the demo's config as the loop parses it
    demo = demo_settings()
    loop = demo.training
    add_optimizer_args(parser, loop.optimizer, loop.weight_decay, loop.weight_decay_on)
    add_penalty_args(parser, loop.loss, loop.huber_delta,
                     "both arms' penalty (default: the loop's own, huber; mse gives the runs before 2026-12-06)")
    parser.add_argument("--start-rattle", type=int, default=demo.start.rattle,
                        help="the loop's rattled bootstrap copies (default: the loop's own, %(default)s)")
    parser.add_argument("--start-torsions", type=int, default=demo.start.torsions,
                        help="the loop's bootstrap copies with turned rotatable bonds (default: the loop's own, "
                             "%(default)s)")
    parser.add_argument("--explore-torsions", type=int, default=demo.explore.torsions,
                        help="the loop's turned candidates per round (default: the loop's own, %(default)s)")
    parser.add_argument("--restart-from", default=demo.explore.restart_from,
                        choices=get_args(ExploreConfig.model_fields["restart_from"].annotation),
                        help="which labelled structures start the loop's exploration MD (explore.restart_from; "
                             "default: the loop's own, %(default)s)")
    parser.add_argument("--explore-temperatures", type=float, nargs="+", default=demo.explore.temperatures,
                        metavar="K", help="the loop's exploration ladder (explore.temperatures; default: the loop's "
                                          "own, %(default)s; the test set and pool stay at 300/500/800 K)")
    parser.add_argument("--explore-replicas", type=int, default=demo.explore.replicas,
                        help="the loop's MD replicas per temperature (explore.replicas; default: the loop's own, "
                             "%(default)s)")
    parser.add_argument("--explore-steps", type=int, default=demo.explore.steps,
                        help="the loop's MD steps per replica and round (explore.steps; default: the loop's own, "
                             "%(default)s)")
    parser.add_argument("--random-fraction", type=float, default=demo.select.random_fraction,
                        help="share of the loop's picks drawn at random from its MD snapshots "
                             "(select.random_fraction; default: the loop's own, %(default)s)")
    parser.add_argument("--explore-random", action="store_true",
                        help="third arm: the loop with random picks from its own exploration (explore_random)")
    return parser


def oracle_sets(args: argparse.Namespace, generate: bool = True
                ) -> tuple[list[Configuration], Path, list[Configuration]]:
    """The test set (and its file) and the random arm's pool: oracle MD at 300/500/800 K, cached under ``--cache``
    (generated on the first run, read back after: a finished run's settings give back the very same frames;
    ``generate=False`` only reads back)."""
    from ase.build import molecule

    cache = args.cache or args.workdir / "cache"
    try:
        start = molecule(args.molecule)
    except KeyError:
        raise SystemExit(f"--molecule {args.molecule!r}: not a molecule of ase.build.molecule (e.g. CH3CH2OH, "
                         "trans-butane)") from None
    temps = [300.0, 500.0, 800.0]
    test, test_path = cached_md_set(cache, start, ORACLE, temps, args.test_frames, interval=20, equilibration=200,
                                    seed=args.seed + 101, generate=generate)
    pool_frames = max(args.pool_frames, -(-args.reference_frames // len(temps)))
    pool, _ = cached_md_set(cache, start, ORACLE, temps, pool_frames, interval=40, equilibration=200,
                            seed=args.seed + 202, generate=generate)
    return test, test_path, pool


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    test, test_path, pool = oracle_sets(args)
    t_data = time.perf_counter() - t0
    al = active_arm(args, test_path)
    t_al = time.perf_counter() - t0 - t_data
    bootstrap = int(al[0]["calls"])
    random = random_arm(args, test, pool, bootstrap, test_path)
    t_random = time.perf_counter() - t0 - t_data - t_al
    explore_random = active_arm(args, test_path, "explore_random", "random") if args.explore_random else None
    t_explore_random = time.perf_counter() - t0 - t_data - t_al - t_random
    target = interpolate_mae(random, args.max_calls)
    needed = calls_to_reach(al, target)
    result: dict[str, Any] = {
        "al": al, "random": random, "random_mae_at_max_calls": target, "al_calls_to_reach": needed,
        "calls_ratio": None if needed is None else needed / args.max_calls,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "oracle": "GFN2-xTB (tblite)", "molecule": args.molecule, "n_test": len(test), "n_pool": len(pool),
        "seconds": {"data": t_data, "al": t_al, "random": t_random},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "interpolation": "random MAE at max_calls: log-log linear between its neighbours; AL calls: first point at "
                         "or below it, log-log linear with the point before"}
    if explore_random is not None:
        result["explore_random"] = explore_random
        result["seconds"]["explore_random"] = t_explore_random
        reached = calls_to_reach(explore_random, target)
        result["explore_random_calls_ratio"] = None if reached is None else reached / args.max_calls
    if args.reference_frames:
        result["reference"] = reference_model(args, test, pool)
        result["al_final_over_reference"] = al[-1]["f_mae_mev_a"] / result["reference"]["f_mae_mev_a"]
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{'calls':>6} {'AL F MAE':>10} | {'calls':>6} {'random F MAE':>13}")
    for a, r in zip(al + [None] * len(random), random + [None] * len(al)):
        if a is None and r is None:
            break
        left = f"{a['calls']:>6} {a['f_mae_mev_a']:>10.1f}" if a else " " * 17
        right = f"{r['calls']:>6} {r['f_mae_mev_a']:>13.1f}" if r else ""
        print(f"{left} | {right}")
    if explore_random is not None:
        print("explore_random: " + ", ".join(f"{p['calls']}: {p['f_mae_mev_a']:.1f}" for p in explore_random))
    ratio = "never reached" if needed is None else f"{needed:.0f} calls, ratio {needed / args.max_calls:.2f}"
    print(f"random at {args.max_calls} calls: {target:.1f} meV/Å; active learning reaches it at {ratio}")


if __name__ == "__main__":
    run_script(main)

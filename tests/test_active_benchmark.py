"""benchmarks/active_vs_random.py: the calls_ratio arithmetic (the runs themselves take tens of minutes)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("tblite")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "active_vs_random.py"
spec = importlib.util.spec_from_file_location("active_vs_random", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def curve(*points):
    return [{"calls": c, "f_mae_mev_a": m} for c, m in points]


def test_random_error_at_max_calls_is_interpolated_log_log():
    random = curve((100, 400.0), (300, 200.0), (600, 100.0))
    assert bench.interpolate_mae(random, 300) == pytest.approx(200.0)
    assert bench.interpolate_mae(random, 424.26) == pytest.approx(141.42, rel=1e-3)  # geometric mean point
    assert bench.interpolate_mae(random, 900) == pytest.approx(100.0)  # flat beyond the end


def test_calls_to_reach_takes_the_first_crossing():
    al = curve((50, 300.0), (100, 150.0), (200, 90.0), (300, 110.0))
    assert bench.calls_to_reach(al, 150.0) == pytest.approx(100.0)
    t = math.log(150 / 120) / math.log(150 / 90)  # how far from 150 towards 90 the target lies, in log
    assert bench.calls_to_reach(al, 120.0) == pytest.approx(100 * 2**t)
    assert bench.calls_to_reach(al, 400.0) == 50.0
    assert bench.calls_to_reach(al, 50.0) is None


def test_optimiser_and_loss_options_default_to_the_loop_and_reach_both_arms(tmp_path):
    """Without options both arms train as ``equiforce learn`` does; with them, both get the same optimiser and loss."""
    from equiforce.active.config import parse_learn_config
    from equiforce.demo.ethanol import learn_config

    loop = parse_learn_config(learn_config(tmp_path, tmp_path / "test.xyz", 1.0, 0, False), "demo").training
    assert (loop.loss, loop.huber_delta) == ("huber", 0.01)
    args = bench.build_parser().parse_args(["--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path)])
    assert (args.optimizer, args.weight_decay, args.weight_decay_on, args.loss, args.huber_delta) == (
        loop.optimizer, loop.weight_decay, loop.weight_decay_on, loop.loss, loop.huber_delta)
    args = bench.build_parser().parse_args(["--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path),
                                            "--optimizer", "adamw", "--weight-decay", "5e-3",
                                            "--weight-decay-on", "interactions", "--round-time", "7",
                                            "--loss", "mse", "--huber-delta", "0.02"])
    training = parse_learn_config(bench.arm_config(args, tmp_path / "test.xyz"), "test").training
    assert (training.optimizer, training.weight_decay, training.weight_decay_on) == ("adamw", 5e-3, "interactions")
    assert (training.loss, training.huber_delta) == ("mse", 0.02)
    assert training.max_time == 7


def test_bootstrap_and_torsion_options_default_to_the_loop_and_reach_its_config(tmp_path):
    from equiforce.active.config import parse_learn_config
    from equiforce.demo.ethanol import learn_config

    demo = parse_learn_config(learn_config(tmp_path, tmp_path / "test.xyz", 1.0, 0, False), "demo")
    base = ["--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path)]

    def parsed(*options: str):
        args = bench.build_parser().parse_args(base + list(options))
        return parse_learn_config(bench.arm_config(args, tmp_path / "t.xyz"), "t")

    def loop_options(config):
        return (config.start.rattle, config.start.torsions, config.explore.torsions, config.explore.restart_from,
                config.explore.temperatures, config.explore.replicas, config.explore.steps,
                config.select.random_fraction)

    assert loop_options(parsed()) == loop_options(demo)
    config = parsed("--start-rattle", "5", "--start-torsions", "3", "--explore-torsions", "2",
                    "--restart-from", "labelled_md", "--explore-temperatures", "300", "600", "1000",
                    "--explore-replicas", "4", "--explore-steps", "900", "--random-fraction", "0.25")
    assert loop_options(config) == (5, 3, 2, "labelled_md", [300.0, 600.0, 1000.0], 4, 900, 0.25)


def test_molecule_option_sets_the_loops_start(tmp_path):
    from equiforce.active.config import parse_learn_config

    base = ["--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path)]
    config = parse_learn_config(bench.arm_config(bench.build_parser().parse_args(base), tmp_path / "t.xyz"), "t")
    assert config.start.structures == ["molecule:CH3CH2OH"]  # ethanol, as the demo
    args = bench.build_parser().parse_args(base + ["--molecule", "trans-butane"])
    config = parse_learn_config(bench.arm_config(args, tmp_path / "t.xyz"), "t")
    assert config.start.structures == ["molecule:trans-butane"]


def test_random_rounds_keep_earlier_frames_and_hold_out_every_kth():
    """The random arm's round n+1 adds frames to round n's (one permutation), and ``al_training_limit.py`` gets
    back exactly the frames a round trained on."""
    pool = list(range(100))  # stands in for configurations: only their order matters
    train_a, valid_a = bench.random_round_frames(pool, 24, seed=2, valid_fraction=0.15)
    train_b, valid_b = bench.random_round_frames(pool, 74, seed=2, valid_fraction=0.15)
    assert (len(train_a) + len(valid_a), len(train_b) + len(valid_b)) == (24, 74)
    assert set(train_a) <= set(train_b) and set(valid_a) <= set(valid_b)
    assert len(valid_b) == 74 // 7  # every 7th (1 / 0.15 rounded) is held out
    assert bench.random_round_frames(pool, 24, seed=2, valid_fraction=0.15) == (train_a, valid_a)
    assert bench.random_round_frames(pool, 24, seed=3, valid_fraction=0.15) != (train_a, valid_a)


def test_training_limit_script_names_what_is_not_a_finished_run(tmp_path):
    spec_ = importlib.util.spec_from_file_location("al_training_limit", SCRIPT.parent / "al_training_limit.py")
    limit = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(limit)
    bogus = tmp_path / "results.json"
    bogus.write_text('{"al": []}')
    with pytest.raises(SystemExit, match="results.json: not the results JSON"):
        limit.run_settings(bogus)
    with pytest.raises(SystemExit, match="config.yaml: missing"):
        limit.loop_config(tmp_path, 60.0)


def test_pool_select_picks_only_available_candidates_with_the_loops_selection(tmp_path):
    """``al_pool_select.py``'s choice: the loop's ``select.*`` on candidates not yet taken, indices into the pool."""
    import numpy as np
    from ase.build import molecule

    from equiforce.active.config import parse_learn_config
    from equiforce.data.structure import Configuration
    from equiforce.demo.ethanol import learn_config
    from equiforce.uq.ensemble import EnsemblePotential
    from equiforce.uq.file import save_uq_model
    from tests.conftest import make_model

    spec_ = importlib.util.spec_from_file_location("al_pool_select", SCRIPT.parent / "al_pool_select.py")
    pool_select = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(pool_select)
    cfg = parse_learn_config(learn_config(tmp_path, tmp_path / "test.xyz", 1.0, 0, False), "demo")
    path = save_uq_model(EnsemblePotential.from_members([make_model("small", seed=s) for s in range(2)]),
                         tmp_path / "model.eqf")
    rng = np.random.default_rng(0)
    start = molecule("CH3CH2OH")

    def frame(k: int) -> Configuration:
        atoms = start.copy()
        atoms.positions += rng.normal(scale=0.03 * (1 + k % 4), size=atoms.positions.shape)
        return Configuration.from_atoms(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)), frame=k)

    candidates = [frame(k) for k in range(30)]
    available = np.ones(30, dtype=bool)
    available[:10] = False  # taken in earlier rounds
    train, valid = [frame(k) for k in range(6)], [frame(k) for k in range(3)]
    picks = pool_select.choose(path, candidates, available, train, valid, 8, cfg, np.random.default_rng(1))
    assert len(picks) == len(set(picks)) == 8
    assert all(10 <= i < 30 for i in picks)
    again = pool_select.choose(path, candidates, available, train, valid, 8, cfg, np.random.default_rng(1))
    assert again == picks  # a rerun with the same seed makes the same choice

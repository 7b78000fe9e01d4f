"""The converging-trainer features: learning-rate schedule, stage two, batching by atoms/edges, Huber and
per-config-type weights, the wall-clock budget, and exact resume with all of them switched on."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from ase.io import write
from safetensors.torch import load_file

from equiforce.data import keys as K
from equiforce.errors import ConfigError
from equiforce.models.file import load_model
from equiforce.train.batching import make_batches, pack_batches
from equiforce.train.config import load_config, parse_config
from equiforce.train.loss import WeightedLoss
from equiforce.train.schedule import LearningRate
from equiforce.train.trainer import train
from tests.test_train import emt_frames, write_config

FULL = dict(scheduler="cosine", warmup_steps=3, min_lr=1e-4, batch_by="atoms", max_batch_atoms=14, loss="huber",
            huber_delta=0.05, config_type_weights={"Default": 2.0}, select_by="forces_mae",
            stage_two={"start": 0.5, "lr": 0.002, "energy_weight": 50.0}, epochs=6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    write(path / "train.xyz", emt_frames(20, seed=1), format="extxyz")
    write(path / "test.xyz", emt_frames(4, seed=2), format="extxyz")
    return path


def test_warmup_then_cosine_to_min_lr():
    lr = LearningRate(0.01, "cosine", min_lr=0.001, warmup_steps=4)
    assert [round(lr(s, 0.0, 0), 6) for s in range(4)] == [0.0025, 0.005, 0.0075, 0.01]
    assert lr(10, 0.5, 3) == pytest.approx(0.0055)
    assert lr(99, 1.0, 9) == pytest.approx(0.001)
    lr.restart(0.002, 0.5)  # a new phase decays from its own start to the end of training
    assert lr(100, 0.5, 5) == pytest.approx(0.002) and lr(101, 1.0, 9) == pytest.approx(0.001)


def test_plateau_cuts_after_patience_and_round_trips():
    lr = LearningRate(0.01, "plateau", plateau_factor=0.5, plateau_patience=2)
    for criterion in (1.0, 0.9, 0.95, 0.95, 0.95):
        lr.epoch_end(criterion)
    assert lr(0, 0.0, 0) == pytest.approx(0.005)
    other = LearningRate(0.1, "plateau")
    other.load_state_dict(lr.state_dict())
    assert other(0, 0.0, 0) == lr(0, 0.0, 0) and other.bad_epochs == lr.bad_epochs
    assert LearningRate(0.01, "exponential", gamma=0.5)(0, 0.0, 2) == pytest.approx(0.0025)


def test_exponential_decay_starts_again_from_a_new_phase():
    """Stage two's rate is its own ``lr`` at its first epoch, not that rate times the decay so far."""
    lr = LearningRate(0.01, "exponential", gamma=0.5)
    lr.restart(0.002, 0.5, 3)
    assert lr(40, 0.5, 3) == pytest.approx(0.002) and lr(50, 0.6, 4) == pytest.approx(0.001)
    other = LearningRate(0.01, "exponential", gamma=0.5)
    other.load_state_dict(lr.state_dict())  # a resumed run keeps the phase's start
    assert other(50, 0.6, 4) == pytest.approx(0.001)


def test_packing_respects_budget_and_keeps_every_structure():
    sizes = [5, 9, 3, 30, 2, 7, 7]
    batches = pack_batches(range(len(sizes)), sizes, limit=12)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert [3] in batches  # larger than the budget: alone
    assert all(sum(sizes[i] for i in b) <= 12 for b in batches if len(b) > 1)
    assert make_batches([3, 1, 2, 0], "structures", 3) == [[3, 1, 2], [0]]
    assert make_batches([0, 1, 2], "edges", 1, edges=[4, 4, 4], max_edges=8) == [[0, 1], [2]]


def test_huber_is_mse_near_zero_and_linear_far_away():
    pred = {K.ENERGY: torch.tensor([0.0, 0.0]), K.FORCES: torch.tensor([[0.001, 0.0, 0.0], [1.0, 0.0, 0.0]])}
    batch = {K.ENERGY: torch.zeros(2), K.FORCES: torch.zeros(2, 3), K.N_ATOMS: torch.tensor([1, 1]),
             K.BATCH: torch.tensor([0, 1]), K.WEIGHT: torch.ones(2), K.HAS_ENERGY: torch.ones(2),
             K.HAS_FORCES: torch.ones(2)}
    mse = WeightedLoss(kind="mse").components(pred, batch)["forces"]
    huber = WeightedLoss(kind="huber", huber_delta=0.01).components(pred, batch)["forces"]
    assert mse == pytest.approx((0.001**2 + 1.0) / 6)
    assert huber == pytest.approx((0.001**2 + 2 * 0.01 * (1.0 - 0.005)) / 6)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="batch_by: atoms needs max_batch_atoms"):
        parse_config({"data": {"train": "x"}, "training": {"batch_by": "atoms"}})
    with pytest.raises(ConfigError, match=r"training\.stage_two\.strat"):
        parse_config({"data": {"train": "x"}, "training": {"stage_two": {"strat": 0.5}}})
    with pytest.raises(ConfigError, match="not a duration"):
        parse_config({"data": {"train": "x"}, "training": {"max_time": "ten minutes"}})
    assert parse_config({"data": {"train": "x"}, "training": {"max_time": "1.5h"}}).training.max_time == 5400


def test_stage_two_and_schedule_in_the_log(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(load_config(write_config(tmp_path / "c.yaml", data_dir, out, **FULL)), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 1, 1, 2, 2, 2]
    assert records[0]["lr"] < records[1]["lr"]  # warm-up
    assert records[3]["lr"] == pytest.approx(0.002, rel=1e-6)  # stage two restarts at its own rate
    assert records[-1]["lr_end"] < records[3]["lr"]  # and decays again
    assert all(r["configs_per_s"] > 0 for r in records)
    assert result["best_epoch"] >= 1 and math.isfinite(result["valid"]["forces_mae"])


def test_stage_two_restarts_an_exponential_decay_at_its_own_rate(data_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", data_dir, out, scheduler="exponential", exponential_gamma=0.5, epochs=4,
                          stage_two={"start": 0.5, "lr": 0.002, "energy_weight": 50.0})
    train(load_config(config), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 1, 2, 2]
    assert records[2]["lr"] == pytest.approx(0.002, rel=1e-6) and records[3]["lr"] == pytest.approx(0.001, rel=1e-6)


def test_selecting_by_a_quantity_the_validation_set_lacks_is_an_error(tmp_path):
    """Selecting best.eqf by stress on stress-free data would never find a best epoch (no best.eqf at all)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = emt_frames(10, seed=1)
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    write(tmp_path / "train.xyz", frames, format="extxyz")
    write(tmp_path / "test.xyz", frames[:2], format="extxyz")
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run", select_by="stress_mae"))
    with pytest.raises(ConfigError, match="select_by: stress_mae needs stress labels in the validation set"):
        train(config, progress=False)


@pytest.mark.parametrize("change", [{"weight_decay_on": "all"}, {"dtype": "float32"}, {"optimizer": "adam"}])
def test_resuming_with_other_parameter_groups_or_precision_is_refused(data_dir, tmp_path, change):
    """The checkpoint's optimizer state belongs to its parameter groups and precision: a changed setting is a
    clear error naming it, not a raw optimizer error or a silently different run."""
    base = dict(epochs=1, optimizer="adamw", weight_decay=1e-3, weight_decay_on="interactions")
    train(load_config(write_config(tmp_path / "a.yaml", data_dir, tmp_path / "run", **base)), progress=False)
    changed = load_config(write_config(tmp_path / "b.yaml", data_dir, tmp_path / "run", **{**base, "epochs": 2,
                                                                                           **change}))
    key = next(iter(change))
    with pytest.raises(ConfigError, match=f"was trained with training.{key}: .*output.resume: false"):
        train(changed, progress=False)


def test_resume_is_exact_with_every_feature(data_dir, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    train(load_config(write_config(tmp_path / "ref.yaml", data_dir, ref_out, **FULL)), progress=False)
    config = load_config(write_config(tmp_path / "run.yaml", data_dir, out, **FULL))

    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 4:  # just after stage two began
            raise Killed

    with pytest.raises(Killed):
        train(config, progress=False, epoch_callback=kill)
    result = train(config, progress=False)
    assert result["resumed_from"] == 4
    for name in ("last.eqf", "best.eqf", "checkpoint.safetensors"):
        ours, theirs = load_file(out / name), load_file(ref_out / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_time_budget_stops_mid_epoch_and_saves(data_dir, tmp_path):
    out = tmp_path / "run"
    config = load_config(write_config(tmp_path / "c.yaml", data_dir, out, epochs=1000, max_time=0.5))
    result = train(config, progress=False)
    assert result["out_of_time"] and result["epochs"] < 1000
    assert (out / "best.eqf").is_file() and (out / "checkpoint.safetensors").is_file()
    assert train(config, progress=False)["epochs"] == result["epochs"]  # a spent budget trains no more


def test_early_stopping_after_patience_epochs_without_improvement(data_dir, tmp_path):
    """With a learning rate too small to move float64 weights, the validation loss never improves after
    epoch 1: training stops after exactly ``patience`` more epochs, checkpointed, and says so."""
    out = tmp_path / "run"
    config = load_config(write_config(tmp_path / "c.yaml", data_dir, out, epochs=50, lr=1e-30,
                                      max_epochs_without_improvement=3))
    result = train(config, progress=False)
    assert result["stopped_early"] and result["epochs"] == 4 and result["best_epoch"] == 1
    assert (out / "checkpoint.safetensors").is_file()
    assert train(config, progress=False)["epochs"] == 4  # resumed: an early-stopped run stays stopped


@pytest.mark.parametrize("clip", [0.5, None])
def test_gradient_clipping_uses_the_configured_norm(data_dir, tmp_path, monkeypatch, clip):
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(load_config(write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1, clip_grad=clip)),
          progress=False)
    assert calls == ([clip] * 4 if clip is not None else [])  # 16 training structures in batches of 4


def test_separate_validation_file_is_used_as_given(data_dir, tmp_path):
    path = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["valid"] = str(data_dir / "test.xyz")
    path.write_text(yaml.safe_dump(raw))
    result = train(load_config(path), progress=False)
    assert result["n_train"] == 20 and result["n_valid"] == 4  # no structure moved out of train.xyz


def test_tf32_trains_in_float32_and_restores_the_matmul_flags(data_dir, tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    result = train(load_config(write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1,
                                            dtype="tf32")), progress=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    model = load_model(result["best_model"])
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_weight_decay_on_interactions_spares_embedding_and_readouts(optimizer):
    """With zero gradients only the decay moves weights: interaction blocks shrink, the rest stays put."""
    from equiforce.models.potential import build_model
    from equiforce.train.trainer import build_optimizer

    torch.manual_seed(0)
    model = build_model(dict(elements=[1, 8], channels=8, max_l=1, sh_lmax=2, correlation=2, num_layers=2,
                             cutoff=4.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = dict(optimizer=optimizer, weight_decay=0.1, weight_decay_on="interactions", lr=0.01)
    cfg = parse_config({"data": {"train": "x"}, "training": training}).training
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    blocks = {n for n in before if n.startswith("blocks.") and before[n].abs().sum() > 0}
    assert moved == blocks and blocks
    for n in moved:
        assert model.get_parameter(n).detach().norm() < before[n].norm()


def test_weight_decay_on_all_reaches_every_parameter():
    from equiforce.models.potential import build_model
    from equiforce.train.trainer import build_optimizer

    model = build_model(dict(elements=[1, 8], channels=8, max_l=1, sh_lmax=2, correlation=2, num_layers=2,
                             cutoff=4.0))
    cfg = parse_config({"data": {"train": "x"}, "training": dict(optimizer="adamw", weight_decay=0.1)}).training
    groups = build_optimizer(model, cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_validation_loss_is_the_same_for_any_batching(tmp_path):
    """The whole-set loss (each term summed, divided once): batches of 2, 3 or 5 structures of different sizes (or a
    DDP shard) must not change the number that picks best.eqf and drives the plateau schedule."""
    frames = emt_frames(20, seed=1)
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    for k in range(0, len(frames), 3):  # structures of 4 and 8 atoms
        atoms = frames[k].repeat((2, 1, 1))
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames[k] = atoms
    write(tmp_path / "train.xyz", frames, format="extxyz")
    write(tmp_path / "test.xyz", frames[:2], format="extxyz")
    losses = []
    for size in (2, 3, 5):
        out = tmp_path / f"b{size}"
        train(load_config(write_config(tmp_path / f"c{size}.yaml", tmp_path, out, epochs=1, lr=1e-30,
                                       valid_batch_size=size)), progress=False)
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["valid_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10) and losses[0] == pytest.approx(losses[2], rel=1e-10)

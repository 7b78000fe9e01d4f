"""Packed datasets (``equiforce pack``) and training streamed from them.

A pack must hold exactly the graphs the in-memory path builds, read back the structures it was made from, resume
an interrupted packing to the same content, and train the same model as the files it came from (same split, E0s,
statistics, batches), with or without reader processes and under torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from safetensors.torch import load_file

from equiforce.cli import main
from equiforce.data import keys as K
from equiforce.data.graph import collate, config_to_graph
from equiforce.data.io import read_configurations
from equiforce.data.packed import INDEX, PROGRESS, GraphStore, pack
from equiforce.data.stats import dataset_statistics
from equiforce.errors import ConfigError, DataError
from equiforce.models.file import read_header
from equiforce.train.config import load_config
from equiforce.train.packed_training import pack_statistics
from equiforce.train.trainer import train
from tests.test_train import emt_frames

CUTOFF = 4.0
MODEL = dict(channels=8, radial_mlp=[16], num_layers=2, max_l=1, sh_lmax=2, correlation=2, cutoff=CUTOFF)


def ethanols(n: int, seed: int) -> list[Atoms]:
    """Rattled ethanol molecules in a box (not periodic) with EMT energies and forces, config type "mol"."""
    frames = []
    for i in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.03, seed=seed * 100 + i)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        atoms.info["config_type"] = "mol"
        frames.append(atoms)
    return frames


def isolated_atoms() -> list[Atoms]:
    frames = []
    for symbol, energy in (("H", -0.5), ("C", -1.5), ("O", -2.0), ("Cu", -3.0), ("Ni", -4.0)):
        atoms = Atoms(symbol, positions=[[0, 0, 0]])
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        atoms.info["config_type"] = "IsolatedAtom"
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Two input files: periodic Cu/Ni cells with stress, then molecules and isolated atoms."""
    root = tmp_path_factory.mktemp("packdata")
    write(root / "cells.xyz", emt_frames(16, seed=11), format="extxyz")
    write(root / "mols.xyz", ethanols(8, seed=3) + isolated_atoms(), format="extxyz")
    return [root / "cells.xyz", root / "mols.xyz"]


@pytest.fixture(scope="module")
def packed(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "data.pack"
    pack(files, out, cutoff=CUTOFF, shard_mb=0.008)  # several shards
    return out


def test_pack_holds_the_graphs_the_files_give(files, packed):
    configs = [c for f in files for c in read_configurations(f)]
    store = GraphStore.open(packed)
    index = json.loads((packed / INDEX).read_text())
    assert len(store) == len(configs) == index["structures"] == 29
    assert len(index["shards"]) > 2 and not (packed / PROGRESS).exists()
    assert index["elements"] == [1, 6, 8, 28, 29] and index["config_types"] == ["Default", "IsolatedAtom", "mol"]
    assert [s["structures"] for s in index["sources"]] == [16, 13]
    for k, config in enumerate(configs):
        expected, got = config_to_graph(config, CUTOFF), store[k]
        assert expected.keys() == got.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), (k, key)
    assert store.column("isolated").sum() == 5
    assert store.column("n_edges").tolist() == [int(config_to_graph(c, CUTOFF)[K.EDGE_INDEX].shape[1])
                                                for c in configs]
    # a slice is a store; a batch from it equals the batch from the graphs
    batch, expected = collate(store[3:7]), collate([config_to_graph(c, CUTOFF) for c in configs[3:7]])
    assert all(torch.equal(batch[key], expected[key]) for key in expected)


def test_pack_reads_back_as_the_structures_it_was_made_from(files, packed):
    originals = [c for f in files for c in read_configurations(f)]
    back = read_configurations(packed)
    assert len(back) == len(originals)
    for a, b in zip(originals, back):
        assert (a.source, a.frame, a.config_type, a.weight) == (b.source, b.frame, b.config_type, b.weight)
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.pbc, b.pbc)
        np.testing.assert_array_equal(a.cell, b.cell)
        assert a.energy == b.energy
        for name in ("forces", "stress"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), name
    assert len(read_configurations(packed, index="2:5")) == 3
    from equiforce.data.io import read_atoms  # what md, relax and learn start from

    atoms = read_atoms(packed, index="-1")
    assert len(atoms) == 1 and atoms[0].get_chemical_symbols() == ["Ni"]


def test_statistics_from_the_summary_equal_those_from_the_graphs(files, packed):
    store = GraphStore.open(packed)
    structures = store.subset(np.flatnonzero(store.column("isolated") == 0))
    e0s = {1: -0.1, 6: -1.0, 8: -2.0, 28: -3.0, 29: -4.0}
    ours, theirs = pack_statistics(structures, e0s), dataset_statistics(list(structures), e0s)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key


def test_float32_pack_is_half_the_size_and_rounds_only_floats(files, tmp_path):
    out = tmp_path / "f32"
    pack(files, out, cutoff=CUTOFF, dtype="float32")
    store = GraphStore.open(out)
    graph, exact = store[0], config_to_graph(read_configurations(files[0])[0], CUTOFF)
    assert graph[K.POSITIONS].dtype == torch.float32 and torch.equal(graph[K.EDGE_INDEX], exact[K.EDGE_INDEX])
    torch.testing.assert_close(graph[K.FORCES].double(), exact[K.FORCES], rtol=1e-6, atol=1e-7)


class _Killed(Exception):
    pass


def pack_killed_after(count: int, inputs: list[Path], out: Path, **options) -> None:
    """Pack ``inputs`` into ``out`` as a kill after ``count`` structures would leave it (shards and progress)."""

    def kill(done: int) -> None:
        if done == count:
            raise _Killed

    with pytest.raises(_Killed):
        pack(inputs, out, cutoff=CUTOFF, progress=kill, **options)


def test_an_interrupted_pack_resumes_to_the_same_content(files, packed, tmp_path):
    out = tmp_path / "resumed"

    pack_killed_after(20, files, out, shard_mb=0.008)
    progress = json.loads((out / PROGRESS).read_text())
    assert progress["shards"] and not (out / INDEX).exists()
    with pytest.raises(DataError, match="unfinished pack"):
        GraphStore.open(out)
    with pytest.raises(ConfigError, match="other cutoff"):
        pack(files, out, cutoff=5.0, shard_mb=0.008)
    seen: list[int] = []
    index = pack(files, out, cutoff=CUTOFF, shard_mb=0.008, progress=seen.append)
    assert seen[0] > 1  # started after the shards already written
    assert index["content_sha256"] == json.loads((packed / INDEX).read_text())["content_sha256"]
    with pytest.raises(ConfigError, match="already holds a finished pack"):
        pack(files, out, cutoff=CUTOFF)
    assert pack(files, out, cutoff=CUTOFF, overwrite=True)["structures"] == 29


def test_damaged_packs_and_bad_input_are_named(files, packed, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    (copy / "shard-00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(DataError, match="shard-00001.safetensors is missing or has another size"):
        GraphStore.open(copy)
    (copy / INDEX).write_text("{not json")
    with pytest.raises(DataError, match="cannot read index.json"):
        GraphStore.open(copy)
    frames = emt_frames(3, seed=2)
    frames[1].calc.results["forces"][0, 0] = np.nan
    bad = tmp_path / "bad.xyz"
    write(bad, frames, format="extxyz")
    with pytest.raises(DataError, match=r"bad.xyz, frame 1, field 'forces'"):
        pack([bad], tmp_path / "badpack", cutoff=CUTOFF)
    assert not (tmp_path / "badpack").exists()  # nothing written to resume: no directory left behind
    with pytest.raises(DataError, match="is a packed dataset, not a structure file"):
        pack([packed], tmp_path / "repack", cutoff=CUTOFF)
    with pytest.raises(DataError, match="is a directory, neither a structure file nor a pack"):
        pack([tmp_path], tmp_path / "repack", cutoff=CUTOFF)
    assert not (tmp_path / "repack").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"mine holds other files than a pack's \(notes.txt\)"):
        pack(files, mine, cutoff=CUTOFF, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def config(path: Path, train_data: Path | str, out: Path, **extra) -> Path:
    data_section = {"train": str(train_data), "valid_fraction": 0.25, "e0s": "isolated", **extra.pop("data", {})}
    path.write_text(yaml.safe_dump({
        "data": data_section, "model": MODEL,
        "training": {"epochs": 3, "batch_size": 4, "lr": 0.01, "device": "cpu", "seed": 2,
                     "config_type_weights": {"mol": 2.0}, **extra},
        "output": {"directory": str(out)}}))
    return path


@pytest.fixture(scope="module")
def joined(files, tmp_path_factory) -> Path:
    """The two input files as one, so the in-memory run sees the same structures in the same order."""
    path = tmp_path_factory.mktemp("joined") / "all.xyz"
    from ase.io import read

    write(path, [a for f in files for a in read(f, ":")], format="extxyz")
    return path


@pytest.fixture(scope="module")
def from_files(joined, tmp_path_factory):
    root = tmp_path_factory.mktemp("fromfiles")
    return train(load_config(config(root / "c.yaml", joined, root / "run")), progress=False), root / "run"


def test_training_on_a_pack_equals_training_on_its_files(joined, from_files, tmp_path):
    store_dir = tmp_path / "one.pack"
    pack([joined], store_dir, cutoff=CUTOFF)
    result = train(load_config(config(tmp_path / "c.yaml", store_dir, tmp_path / "run")), progress=False)
    ref, ref_out = from_files
    assert (result["n_train"], result["n_valid"]) == (ref["n_train"], ref["n_valid"]) == (18, 6)
    ours, theirs = read_header(tmp_path / "run" / "best.eqf"), read_header(ref_out / "best.eqf")
    for key, value in theirs["spec"].items():
        if isinstance(value, float):
            assert ours["spec"][key] == pytest.approx(value, rel=1e-12), key
        else:
            assert ours["spec"][key] == value, key
    assert ours["spec"]["e0s"] == {"1": -0.5, "6": -1.5, "8": -2.0, "28": -4.0, "29": -3.0}
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (tmp_path / "run", ref_out)]
    for a, b in zip(*logs):
        for key in ("train_loss", "valid_loss", "valid_forces_mae", "valid_energy_per_atom_mae"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    weights, expected = load_file(tmp_path / "run" / "last.eqf"), load_file(ref_out / "last.eqf")
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-8, atol=1e-10)
    # the same run resumes; another pack is refused
    assert train(load_config(config(tmp_path / "c.yaml", store_dir, tmp_path / "run")),
                 progress=False)["resumed_from"] == 3
    other = tmp_path / "other.pack"
    pack([joined], other, cutoff=CUTOFF, dtype="float32")
    with pytest.raises(ConfigError, match="other training data"):
        train(load_config(config(tmp_path / "c.yaml", other, tmp_path / "run", epochs=4)), progress=False)


def edge_set(graph) -> list[tuple[int, ...]]:
    return sorted(map(tuple, torch.cat([graph[K.EDGE_INDEX].T, graph[K.SHIFTS].long()], 1).tolist()))


def test_a_pack_at_a_larger_cutoff_trains_the_model_of_a_smaller_one(joined, from_files, tmp_path):
    """Edges beyond the model's cutoff are dropped as structures are read; edge counts (the neighbour
    normalisation, edge-count batches) and closest pairs are those at the model's cutoff: the same model as from
    the files, so one pack serves every cutoff up to its own."""
    store_dir = tmp_path / "wide.pack"
    pack([joined], store_dir, cutoff=CUTOFF + 1.5, shard_mb=0.008)
    wide = GraphStore.open(store_dir)
    narrow = wide.within(CUTOFF)
    graphs = [config_to_graph(c, CUTOFF) for c in read_configurations(joined)]
    assert narrow.cutoff == CUTOFF and wide.within(CUTOFF + 1.5).edge_cutoff is None
    assert narrow.column("n_edges").tolist() == [g[K.EDGE_INDEX].shape[1] for g in graphs]
    assert (wide.column("n_edges") > narrow.column("n_edges")).any()
    assert all(edge_set(narrow[k]) == edge_set(g) for k, g in enumerate(graphs))
    assert narrow[3:9].cutoff == narrow.subset([1, 2]).cutoff == CUTOFF  # slices keep the cutoff
    assert narrow.closest_pairs() == {p: d for p, d in wide.closest_pairs().items() if d < CUTOFF}
    assert narrow.content_sha256() != wide.content_sha256()
    with pytest.raises(DataError, match="packed with neighbours within 5.5 Å, fewer than a 6 Å cutoff needs"):
        wide.within(6.0)
    train(load_config(config(tmp_path / "c.yaml", store_dir, tmp_path / "run")), progress=False)
    ref, ref_out = from_files
    ours, theirs = read_header(tmp_path / "run" / "best.eqf"), read_header(ref_out / "best.eqf")
    assert ours["spec"]["avg_num_neighbors"] == pytest.approx(theirs["spec"]["avg_num_neighbors"], rel=1e-12)
    weights, expected = load_file(tmp_path / "run" / "last.eqf"), load_file(ref_out / "last.eqf")
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-8, atol=1e-10)


def test_eval_streams_a_pack_and_equals_eval_of_its_files(joined, from_files, tmp_path):
    """``equiforce eval`` of a pack reads it batch by batch (nothing held but a batch and the plot's sample) and
    reports what the files give: overall, per config type, at the pack's cutoff or a larger one cut to the
    model's; a pack with an element the model lacks names a structure holding it."""
    model = from_files[1] / "best.eqf"
    wide = tmp_path / "wide.pack"
    pack([joined], wide, cutoff=CUTOFF + 1.5, shard_mb=0.008)
    assert main(["eval", str(model), str(joined), "--out", str(tmp_path / "file")]) == 0
    assert main(["eval", str(model), str(wide), "--out", str(tmp_path / "pack")]) == 0
    ours, theirs = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("pack", "file"))
    assert ours["metrics"].keys() == theirs["metrics"].keys() and "stress_mae" in ours["metrics"]
    for key, value in theirs["metrics"].items():
        assert ours["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert ours["by_config_type"].keys() == theirs["by_config_type"].keys() == {"Default", "mol", "IsolatedAtom"}
    for name, group in theirs["by_config_type"].items():
        for key, value in group.items():
            assert ours["by_config_type"][name][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
    assert (tmp_path / "pack" / "parity.png").stat().st_size > 0
    # --index selects from the pack as from a file
    assert main(["eval", str(model), str(wide), "--index", "2:7", "--out", str(tmp_path / "part")]) == 0
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["metrics"]["n_configs"] == 5

    from equiforce.evaluate import evaluate
    from equiforce.models.file import load_model

    loaded = load_model(model)
    store = GraphStore.open(wide)
    kept = evaluate(loaded, store, keep_values=True, keep_max=100)
    assert kept["values_every"]["forces"] > 1 and len(kept["values"]["forces"][0]) <= 100
    assert kept["forces_mae"] == pytest.approx(ours["metrics"]["forces_mae"], rel=1e-9)
    loaded.spec.elements = [z for z in loaded.spec.elements if z != 1]  # a model that lacks hydrogen
    with pytest.raises(DataError, match=r"frame 16.*H \(Z=1\) not known.*9 structures of .*wide.pack hold it"):
        evaluate(loaded, store)


def test_reader_processes_train_the_same_model(joined, from_files, tmp_path):
    store_dir = tmp_path / "p"
    pack([joined], store_dir, cutoff=CUTOFF)
    train(load_config(config(tmp_path / "c.yaml", store_dir, tmp_path / "run", data={"workers": 2})), progress=False)
    weights, expected = load_file(tmp_path / "run" / "last.eqf"), load_file(from_files[1] / "last.eqf")
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-8, atol=1e-10)


def test_pack_validation_sets_and_config_errors(files, packed, tmp_path):
    valid_pack = tmp_path / "valid"
    pack([files[1]], valid_pack, cutoff=CUTOFF)
    result = train(load_config(config(tmp_path / "v.yaml", packed, tmp_path / "v", epochs=1,
                                      data={"valid": str(valid_pack)})), progress=False)
    assert (result["n_train"], result["n_valid"]) == (24, 8)  # isolated atoms are E0s, not targets
    result = train(load_config(config(tmp_path / "f.yaml", packed, tmp_path / "f", epochs=1,
                                      data={"valid": str(files[1])})), progress=False)
    assert result["n_valid"] == 8
    with pytest.raises(ConfigError, match="packed with neighbours within 4 Å and model.cutoff is 5 Å"):
        path = config(tmp_path / "c.yaml", packed, tmp_path / "c")
        raw = yaml.safe_load(path.read_text())
        raw["model"]["cutoff"] = 5.0
        path.write_text(yaml.safe_dump(raw))
        train(load_config(path), progress=False)
    with pytest.raises(ConfigError, match="config_type_weights names config types"):
        train(load_config(config(tmp_path / "t.yaml", packed, tmp_path / "t", config_type_weights={"typo": 2.0})),
              progress=False)
    with pytest.raises(ConfigError, match="data.forces_key: 'REF_forces' \\(packed with 'forces'\\)"):
        train(load_config(config(tmp_path / "k.yaml", packed, tmp_path / "k", data={"forces_key": "REF_forces"})),
              progress=False)
    energy_only = tmp_path / "energy_only"
    pack([files[0]], energy_only, cutoff=CUTOFF, reader={"forces_key": "REF_forces"})
    with pytest.raises(DataError, match="no structure has forces .*REF_forces"):
        train(load_config(config(tmp_path / "e.yaml", energy_only, tmp_path / "e", data={"e0s": "fit"})),
              progress=False)


def test_pack_command(files, tmp_path, capsys):
    out = tmp_path / "cli.pack"
    assert main(["pack", *map(str, files), "--out", str(out), "--cutoff", "4", "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "packed 29 structures" in printed and f"data.train: {out}" in printed
    assert "5 of 29 structures have no forces" in printed
    assert main(["pack", str(files[0]), "--out", str(out), "--cutoff", "4", "--no-progress"]) == 2
    assert "already holds a finished pack" in " ".join(capsys.readouterr().err.split())
    assert main(["pack", str(tmp_path / "missing.xyz"), "--out", str(tmp_path / "m"), "--cutoff", "4"]) == 2
    assert "missing.xyz: file not found" in " ".join(capsys.readouterr().err.split())
    # an interrupted pack: a failure says what is kept, and the rerun says it resumes
    half = tmp_path / "half.pack"
    pack_killed_after(20, files, half, shard_mb=0.008)
    assert main(["pack", *map(str, files), "--out", str(half), "--cutoff", "5", "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "other cutoff (4.0, now 5.0)" in err and "keeps the shards packed so far" in err
    assert main(["pack", *map(str, files), "--out", str(half), "--cutoff", "4", "--shard-mb", "0.008",
                 "--no-progress"]) == 0
    assert "resuming the unfinished pack" in " ".join(capsys.readouterr().out.split())


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="no torchrun")
def test_two_ranks_on_a_pack_equal_one_process_with_the_union_batch(tmp_path):
    data = tmp_path / "train.xyz"
    write(data, emt_frames(20, seed=4), format="extxyz")  # equal-size cells: the union batch has the same gradient
    store_dir = tmp_path / "train.pack"
    pack([data], store_dir, cutoff=CUTOFF)

    def run_config(name: str, batch: int) -> Path:
        return config(tmp_path / f"{name}.yaml", store_dir, tmp_path / name, batch_size=batch, config_type_weights={},
                      data={"e0s": "fit", "valid_fraction": 0.2})  # 16 training cells: whole batches

    train(load_config(run_config("one", 4)), progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "equiforce.cli", "train",
               str(run_config("two", 2)), "--no-progress"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = load_file(tmp_path / "two" / "last.eqf"), load_file(tmp_path / "one" / "last.eqf")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-8, atol=1e-10)


def test_structures_are_read_one_at_a_time_from_where_a_pack_stopped(files, tmp_path):
    from equiforce.data.io import iter_configurations

    whole = read_configurations(files[0])
    tail = list(iter_configurations(files[0], start=10))
    assert [c.frame for c in tail] == list(range(10, 16))
    np.testing.assert_array_equal(tail[0].positions, whole[10].positions)
    text = files[0].read_text().splitlines()
    broken = tmp_path / "broken.xyz"
    broken.write_text("\n".join(text[: len(text) * 3 // 4 + 3]) + "\n")  # a frame cut off after its first atom
    with pytest.raises(DataError, match=r"broken.xyz, frame \d+: cannot read structures"):
        pack([broken], tmp_path / "b", cutoff=CUTOFF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_streamed_training_on_cuda_equals_in_memory_training(joined, tmp_path):
    """Pinned host batches moved without blocking (one reader process) train what device-resident graphs train."""
    store_dir = tmp_path / "p"
    pack([joined], store_dir, cutoff=CUTOFF)
    for name, data, workers in (("memory", joined, 0), ("pack", store_dir, 1)):
        train(load_config(config(tmp_path / f"{name}.yaml", data, tmp_path / name, device="cuda", epochs=2,
                                 data={"workers": workers})), progress=False)
    weights, expected = load_file(tmp_path / "pack" / "last.eqf"), load_file(tmp_path / "memory" / "last.eqf")
    for key in expected:  # scatter-adds on a GPU sum in no fixed order
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-6, atol=1e-8)


def test_e0_fit_from_grouped_compositions_equals_the_fit_over_structures(files, packed):
    from equiforce.data.stats import fit_e0s
    from equiforce.train.packed_training import pack_e0s, without_isolated

    store = GraphStore.open(packed)
    configs = [c for f in files for c in read_configurations(f)]
    elements = [1, 6, 8, 28, 29, 79]  # gold: in no structure (E0 0 and a warning, both ways)
    isolated = store.subset(np.flatnonzero(store.column("isolated") != 0))
    with pytest.warns(UserWarning):
        ours = pack_e0s("fit", without_isolated(store), isolated, elements)
    with pytest.warns(UserWarning):
        theirs = fit_e0s(configs, elements)
    assert ours.keys() == theirs.keys()
    for z in theirs:
        assert ours[z] == pytest.approx(theirs[z], rel=1e-10, abs=1e-10), z


def test_a_test_pack_is_evaluated_batch_by_batch(files, packed, tmp_path):
    """data.test may be a pack (at the model's cutoff or more): its errors are those of the same structures read
    from their file; an element the model lacks, or too small a cutoff, is found before training."""
    wide = tmp_path / "test.pack"
    pack([files[1]], wide, cutoff=CUTOFF + 1.0)
    on_pack = train(load_config(config(tmp_path / "a.yaml", packed, tmp_path / "a", epochs=1,
                                       data={"test": str(wide)})), progress=False)["test"]
    on_file = train(load_config(config(tmp_path / "b.yaml", packed, tmp_path / "b", epochs=1,
                                       data={"test": str(files[1])})), progress=False)["test"]
    assert on_pack["n_configs"] == on_file["n_configs"] == 13
    for key, value in on_file.items():
        assert on_pack[key] == pytest.approx(value, rel=1e-9), key
    narrow = tmp_path / "narrow.pack"
    pack([files[1]], narrow, cutoff=CUTOFF - 1.0)
    with pytest.raises(DataError, match="packed with neighbours within 3 Å, fewer than a 4 Å cutoff needs"):
        train(load_config(config(tmp_path / "c.yaml", packed, tmp_path / "c", data={"test": str(narrow)})),
              progress=False)
    cells = tmp_path / "cells.pack"
    pack([files[0]], cells, cutoff=CUTOFF)
    with pytest.raises(DataError, match=r"frame 0.*element 1 not in the model's elements \[28, 29\]"):
        train(load_config(config(tmp_path / "d.yaml", cells, tmp_path / "d", config_type_weights={},
                                 data={"test": str(wide), "e0s": "fit"})), progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d" / "last.eqf").exists()
    damaged = tmp_path / "damaged.pack"
    shutil.copytree(wide, damaged)
    with open(damaged / "shard-00000.safetensors", "r+b") as handle:  # same size: only its header is wrong
        handle.write(b"\xff" * 16)
    with pytest.raises(DataError, match="cannot read shard-00000"):  # before training, not after it
        train(load_config(config(tmp_path / "e.yaml", packed, tmp_path / "e", data={"test": str(damaged)})),
              progress=False)
    assert not (tmp_path / "e" / "last.eqf").exists()


def test_an_element_only_in_the_validation_set_is_refused(files, tmp_path):
    """It would enter the model untrained (E0 0, random weights) and be validated as such: refused before
    training, from files and from packs, naming a validation structure that holds it."""
    cells = tmp_path / "cells.pack"
    pack([files[0]], cells, cutoff=CUTOFF)
    valid_pack = tmp_path / "mols.pack"
    pack([files[1]], valid_pack, cutoff=CUTOFF)
    for train_data, valid in ((files[0], files[1]), (cells, files[1]), (cells, valid_pack)):
        path = config(tmp_path / "c.yaml", train_data, tmp_path / "run", config_type_weights={},
                      data={"valid": str(valid), "e0s": "fit"})
        with pytest.raises(DataError, match=r"mols.xyz, frame 0.*H \(Z=1\), C \(Z=6\), O \(Z=8\) occur in "
                                            "validation structures but in no training structure"):
            train(load_config(path), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_validation_pack_must_have_the_model_cutoff(files, packed, tmp_path):
    other = tmp_path / "valid2"
    pack([files[1]], other, cutoff=2.0)
    with pytest.raises(ConfigError, match=r"the validation set\) was packed with neighbours within 2 Å"):
        train(load_config(config(tmp_path / "c.yaml", packed, tmp_path / "c", data={"valid": str(other)})),
              progress=False)


def test_label_keys_follow_the_pack(files, tmp_path):
    from ase.io import read

    renamed = []
    for atoms in read(files[0], ":"):
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        renamed.append(atoms)
    write(tmp_path / "ref.xyz", renamed[:12], format="extxyz")
    write(tmp_path / "ref_valid.xyz", renamed[12:], format="extxyz")
    store_dir = tmp_path / "ref.pack"
    pack([tmp_path / "ref.xyz"], store_dir, cutoff=CUTOFF, reader={"energy_key": "REF_energy",
                                                                    "forces_key": "REF_forces"})
    # a validation file is read with the pack's keys (the config does not repeat them)
    result = train(load_config(config(tmp_path / "c.yaml", store_dir, tmp_path / "c", epochs=1, config_type_weights={},
                                      data={"valid": str(tmp_path / "ref_valid.xyz"), "e0s": "fit"})), progress=False)
    assert result["n_valid"] == 4 and result["valid"]["forces_mae"] > 0
    assert len(read_configurations(store_dir)) == 12  # default keys: the pack's labels
    with pytest.raises(DataError, match="energy_key 'energy2' \\(packed with 'REF_energy'\\)"):
        read_configurations(store_dir, energy_key="energy2")


def test_single_frame_files_and_databases_resume(tmp_path, monkeypatch):
    import ase.db

    from equiforce.data.io import iter_configurations

    frames = emt_frames(6, seed=8)
    write(tmp_path / "POSCAR", frames[0], format="vasp")  # one frame, no index: ASE reads it only from the start
    assert len(list(iter_configurations(tmp_path / "POSCAR", require_energy=False))) == 1
    assert list(iter_configurations(tmp_path / "POSCAR", start=1, require_energy=False)) == []
    with ase.db.connect(tmp_path / "set.db") as db:
        for atoms in frames:
            db.write(atoms)
    database = [tmp_path / "set.db"]
    clean = pack(database, tmp_path / "clean", cutoff=CUTOFF, shard_mb=1e-6)

    pack_killed_after(3, database, tmp_path / "killed", shard_mb=1e-6)
    assert json.loads((tmp_path / "killed" / PROGRESS).read_text())["position"] == [0, 2]
    monkeypatch.chdir(tmp_path)  # the same file by a relative path
    resumed = pack([Path("set.db")], tmp_path / "killed", cutoff=CUTOFF, shard_mb=1e-6)
    assert resumed["content_sha256"] == clean["content_sha256"] and resumed["structures"] == 6
    back = read_configurations(tmp_path / "killed")
    assert [c.frame for c in back] == list(range(6)) and back[4].energy == pytest.approx(
        frames[4].get_potential_energy())


def test_float32_pack_is_smaller(files, packed, tmp_path):
    out = tmp_path / "small"
    pack(files, out, cutoff=CUTOFF, dtype="float32", shard_mb=0.008)
    from equiforce.data.packed import memory_mapped

    def float_bytes(directory: Path) -> int:  # the labels and positions (headers and integers are the same)
        arrays = [memory_mapped(p) for p in directory.glob("shard-*.safetensors")]
        return sum(a.nbytes for shard in arrays for name, a in shard.items() if a.dtype.kind == "f"
                   and not name.startswith("summary/"))

    assert float_bytes(out) == float_bytes(packed) // 2


def test_packs_of_one_run_must_share_their_label_keys(files, packed, tmp_path):
    other = tmp_path / "ref.pack"
    pack([files[0]], other, cutoff=CUTOFF, reader={"config_type_key": "kind"})
    for role in ("valid", "test"):
        with pytest.raises(ConfigError, match="was packed with other label keys .*config_type_key 'kind' against "
                                              "'config_type'"):
            train(load_config(config(tmp_path / f"{role}.yaml", packed, tmp_path / role, data={role: str(other)})),
                  progress=False)


def test_damaged_index_fields_and_odd_inputs_are_named(files, packed, tmp_path):
    import shutil

    for field, value in (("dtype", "float16"), ("config_types", []), ("shards", "x"), ("cutoff", "four")):
        copy = tmp_path / f"bad_{field}"
        shutil.copytree(packed, copy)
        index = json.loads((copy / INDEX).read_text())
        index[field] = value
        (copy / INDEX).write_text(json.dumps(index))
        with pytest.raises(DataError, match=f"index.json is damaged \\({field}"):
            GraphStore.open(copy)
    copy = tmp_path / "fewer_elements"
    shutil.copytree(packed, copy)
    index = json.loads((copy / INDEX).read_text())
    index["elements"] = index["elements"][:-1]
    (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match="disagree on the elements"):
        GraphStore.open(copy)
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(DataError, match="file is empty"):
        pack([empty], tmp_path / "e", cutoff=CUTOFF)
    assert empty.stat().st_size == 0  # not turned into a database
    with pytest.raises(DataError, match="neither a frame number nor a slice"):
        read_configurations(packed, index="foo")
    with pytest.raises(ConfigError, match="at least 0.5 Å"):
        pack(files, tmp_path / "tiny", cutoff=1e-6)


def test_unwrapped_positions_pack_like_wrapped_ones(tmp_path):
    frames = emt_frames(3, seed=6)
    frames[1].positions[0] += 200 * frames[1].cell[0]  # an MD trajectory's unwrapped atom: shifts of ±200 cells
    write(tmp_path / "unwrapped.xyz", frames, format="extxyz")
    pack([tmp_path / "unwrapped.xyz"], tmp_path / "u", cutoff=CUTOFF)
    store = GraphStore.open(tmp_path / "u")
    exact = config_to_graph(read_configurations(tmp_path / "unwrapped.xyz")[1], CUTOFF)
    assert torch.equal(store[1][K.SHIFTS], exact[K.SHIFTS]) and exact[K.SHIFTS].abs().max() >= 200


def test_an_unfinished_pack_says_so_wherever_it_is_given(files, tmp_path):
    out = tmp_path / "half"

    pack_killed_after(12, files, out, shard_mb=0.008)
    for attempt in (lambda: read_configurations(out),
                    lambda: train(load_config(config(tmp_path / "c.yaml", out, tmp_path / "c")), progress=False)):
        with pytest.raises(DataError, match="unfinished pack has a progress.json: run equiforce pack again"):
            attempt()
    with pytest.raises(ConfigError, match="--overwrite"):
        pack(files[:1], out, cutoff=CUTOFF, shard_mb=0.008)
    assert pack(files[:1], out, cutoff=CUTOFF, overwrite=True)["structures"] == 16


def test_reader_processes_do_not_hold_the_run_lock_and_pickle_lightly(packed, tmp_path):
    import pickle  # noqa: S403  (how a DataLoader hands the store to a reader started by spawn, e.g. on macOS)

    from equiforce.train.loading import BatchReader
    from equiforce.utils.locking import exclusive_lock, release

    store = GraphStore.open(packed)
    lock = exclusive_lock(tmp_path / "train.lock", "training")
    reader = BatchReader(store, torch.device("cpu"), torch.float64, workers=1)
    batches = reader.epoch([[0, 1], [2]])
    first = next(batches)  # the reader process is running (persistent) from here
    assert torch.equal(first[K.POSITIONS], collate(store[0:2])[K.POSITIONS])
    release(lock)  # the trainer is gone: the lock must be free at once, although its reader lives on
    again = exclusive_lock(tmp_path / "train.lock", "training")
    release(again)
    list(batches)  # the epoch read to its end
    del batches, reader  # and the reader process shut down before the tests that follow
    copy = pickle.loads(pickle.dumps(store[2:9]))  # noqa: S301
    assert len(pickle.dumps(store)) < 20_000  # the summary is mapped again, not copied
    assert all(torch.equal(copy[k][key], store[2 + k][key]) for k in range(7) for key in store[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_reader_process_dies_with_its_trainer(packed):
    """A killed training run leaves no reader behind (PyTorch's watchdog alone let one live for seconds)."""
    import time

    script = (f"import time, torch\nfrom equiforce.data.packed import GraphStore\n"
              f"from equiforce.train.loading import BatchReader\n"
              f"reader = BatchReader(GraphStore.open({str(packed)!r}), torch.device('cpu'), torch.float64, workers=1)\n"
              "batches = reader.epoch([[0, 1], [2]])\nnext(batches)\nprint('reading', flush=True)\ntime.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "reading"
        readers = Path(f"/proc/{trainer.pid}/task/{trainer.pid}/children").read_text().split()
        assert readers
    finally:
        trainer.kill()
        trainer.wait()

    def alive(pid: str) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.monotonic() + 1.5
    while any(alive(pid) for pid in readers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in readers)


def test_learn_starts_from_a_pack(packed):
    from equiforce.active.loop import load_structures

    structures = load_structures([str(packed)])
    assert len(structures) == 29 and structures[-1].get_chemical_symbols() == ["Ni"]


def test_streaming_benchmark_smoke(files, tmp_path):
    """benchmarks/streaming.py at toy size: a pack at a wider cutoff trains, and eval runs on the file and the pack
    with the same errors (the plumbing and JSON; the numbers of docs/benchmarks.md come from real sizes)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(files[1]), "--sizes", "12", "--seconds", "2",
                           "--modes", "pack", "wide", "--eval", "--work-dir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert [row["mode"] for row in result["rows"]] == ["pack, streamed", "pack at 6 Å, streamed"]
    on_file, on_pack = result["evals"]
    assert on_file["n_configs"] == on_pack["n_configs"] == 12
    assert on_pack["forces_mae"] == pytest.approx(on_file["forces_mae"], rel=1e-6)
    assert {info["cutoff"] for info in result["packs"].values()} == {5.0, 6.0}

"""Training from a packed dataset (streamed from disk) against training from the structure file (held in memory).

    python benchmarks/streaming.py --data ../shared/data/rmd17/*.npz --sizes 5000 20000 80000 --seconds 60 \
        --work-dir runs/streaming --out runs/streaming/results.json

The structures of ``--data`` (any format equiforce reads; rMD17's 20 files hold 20,000 molecules of 9–24 atoms)
are shuffled with a fixed seed and written to one extxyz file per size (the first N; beyond the data's size the
shuffled order repeats).  Each size is trained three
ways, each in its own process, one after the other: from the file (every graph built at the start and held in
memory), from a pack of the same file read by the training process, and from the pack with one reader process.
Every run trains ``--seconds`` of wall-clock time (``training.max_time``) with the same small model and reports:

* ``startup_s``: the process's wall time outside its epochs (reading, graph building, statistics, model set-up,
  exit);
* ``configs_per_s``: structures stepped on per second of training (the trainer's ``train_time``);
* ``peak_rss_mb``: the training process's peak resident memory (``VmHWM``), and at its end the private part
  (``end_anon_mb``) and the file-backed part (``end_file_mb``: libraries and, from a pack, the shard pages mapped
  from the page cache, which the kernel can drop); ``reader_peak_rss_mb`` for a reader process (forked from the
  trainer, so it shares and counts most of the trainer's pages too).

``pack_s`` and ``pack_mb`` give the one-off cost of ``equiforce pack`` for each size.  ``--modes wide`` adds a
run from a pack made at ``--wide-cutoff`` (its start-up includes counting the edges within the model's 5 Å);
``--eval`` times ``equiforce eval`` of the first run's model on the file (read into memory) and on the pack (read
batch by batch), each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equiforce.data.io import read_configurations, write_extxyz  # noqa: E402
from equiforce.data.packed import pack  # noqa: E402
from equiforce.utils.atomic_io import atomic_write_json  # noqa: E402
from equiforce.utils.script import run_script  # noqa: E402

# the training runs: a name for the table, what is trained from, reader processes
MODES = {"file": ("file, in memory", "file", 0), "pack": ("pack, streamed", "pack", 0),
         "reader": ("pack, 1 reader process", "pack", 1), "wide": ("pack at WIDE Å, streamed", "wide", 0)}
MODEL = {"channels": 32, "max_l": 1, "sh_lmax": 2, "correlation": 2, "num_layers": 2, "cutoff": 5.0}


def joined_file(paths: list[str], size: int, work: Path, seed: int) -> Path:
    """The first ``size`` structures of all ``paths`` in one shuffled order, as one extxyz file (the order repeated
    when ``size`` exceeds the data: a larger data set for memory and start-up, with the same per-step cost)."""
    out = work / f"structures_{size}.xyz"
    if out.exists():
        return out
    configs = [c for path in paths for c in read_configurations(path)]
    order = np.resize(np.random.default_rng(seed).permutation(len(configs)), size)
    write_extxyz([configs[k] for k in order], out)
    return out


# `equiforce train CONFIG`, then the process's own memory into a JSON file: its peak resident set (VmHWM) and, at
# the end, the private (RssAnon) and file-backed (RssFile: libraries and, from a pack, the mapped shard pages that
# the page cache can drop) parts, and the peak of its reader processes (children).  Read inside the process: the
# rusage of a child started by fork also counts the parent's memory at the fork (Linux keeps the high-water mark
# across exec), and this script holds every structure it joined.
PEAK_PROBE = """
import json, resource, sys
from equiforce.cli import main
status = main(sys.argv[2:])
with open("/proc/self/status") as handle:
    fields = dict(line.split(":", 1) for line in handle)
kb = {name: int(fields[name].split()[0]) for name in ("VmHWM", "RssAnon", "RssFile")}
kb["children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps(kb))
sys.exit(status)
"""
MEMORY_FIELDS = (("peak_rss_mb", "VmHWM"), ("end_anon_mb", "RssAnon"), ("end_file_mb", "RssFile"),
                 ("reader_peak_rss_mb", "children"))


def run_probed(command: list[str], out: Path) -> tuple[float, dict[str, float]]:
    """``equiforce COMMAND`` in its own process: its wall time and memory (MB)."""
    log, peak = out / "stderr.txt", out / "memory_kb.json"
    start = time.perf_counter()
    with open(log, "w") as stderr:
        run = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(peak), *command], stdout=subprocess.DEVNULL,
                             stderr=stderr)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{command[0]} in {out} failed:\n{log.read_text()[-3000:]}")
    kb = json.loads(peak.read_text())
    return wall, {name: kb[key] / 1024 for name, key in MEMORY_FIELDS}


def run_training(train: Path, out: Path, seconds: float, workers: int, dtype: str) -> dict[str, Any]:
    """One training process: its wall time, peak memory and the trainer's own log."""
    config = {"data": {"train": str(train), "valid_fraction": 0.02, "workers": workers},
              "model": MODEL,
              "training": {"epochs": 1000, "max_time": seconds, "batch_size": 8, "lr": 0.01, "dtype": dtype,
                           "device": "cpu", "seed": 0},
              "output": {"directory": str(out), "resume": False}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall, memory = run_probed(["train", str(path), "--no-progress"], out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stepped = sum(r["configs_per_s"] * r["time"] for r in records)
    train_time = sum(r["train_time"] for r in records)
    spent = sum(r["time"] for r in records)
    return {"wall_s": wall, "startup_s": wall - spent, "train_time_s": train_time,
            "configs_per_s": stepped / train_time, "epochs": len(records),
            "valid_forces_mae": records[-1].get("valid_forces_mae"), **memory}


def run_eval(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """``equiforce eval MODEL DATA`` in its own process: wall time, memory, and the errors it reports."""
    out.mkdir(parents=True, exist_ok=True)
    wall, memory = run_probed(["eval", str(model), str(data), "--out", str(out), "--batch-size", "32"], out)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {"wall_s": wall, "forces_mae": metrics["forces_mae"], "n_configs": metrics["n_configs"], **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="structure files (rMD17 npz, extxyz, ...)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[20000], help="structures per run")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per run (max_time)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["file", "pack", "reader"],
                        help="training runs per size: from the file, the pack, the pack with a reader process, a "
                             "pack made at --wide-cutoff (the model's 5 Å edges selected as read)")
    parser.add_argument("--wide-cutoff", type=float, default=6.0, help="cutoff of the 'wide' mode's pack (Å)")
    parser.add_argument("--eval", action="store_true",
                        help="also time `equiforce eval` of a trained model on the file and on the pack")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/streaming"))
    parser.add_argument("--out", type=Path, default=Path("runs/streaming/results.json"))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    packs: dict[str, dict[str, Any]] = {}
    for size in args.sizes:
        source = joined_file(args.data, size, args.work_dir, args.seed)
        stores = {}
        for label, cutoff in (("pack", MODEL["cutoff"]), ("wide", args.wide_cutoff)):
            if label == "wide" and "wide" not in args.modes:
                continue
            start = time.perf_counter()
            stores[label] = args.work_dir / f"structures_{size}{'' if label == 'pack' else f'_{cutoff:g}A'}.pack"
            index = pack([source], stores[label], cutoff=cutoff, overwrite=True)
            packs[f"{size} at {cutoff:g} A"] = {
                "structures": size, "cutoff": cutoff, "pack_s": time.perf_counter() - start,
                "pack_mb": (sum(s["bytes"] for s in index["shards"]) + index["summary_bytes"]) / 1e6,
                "file_mb": source.stat().st_size / 1e6, "atoms": index["atoms"], "edges": index["edges"]}
        trained = None
        for key in args.modes:
            mode, data, workers = MODES[key]
            train = source if data == "file" else stores[data]
            name = f"{size}_{key}"
            result = run_training(train, args.work_dir / name, args.seconds, workers, args.dtype)
            trained = trained or args.work_dir / name / "best.eqf"
            mode = mode.replace("WIDE", f"{args.wide_cutoff:g}")
            rows.append({"structures": size, "mode": mode, "workers": workers, **result})
            print(f"{size:>7} {mode:<34} startup {result['startup_s']:7.1f} s  {result['configs_per_s']:7.1f} "
                  f"configs/s  peak RSS {result['peak_rss_mb']:7.0f} MB", flush=True)
        if args.eval and trained is not None:
            for label, data in (("the file", source), ("the pack", stores["pack"])):
                result = run_eval(trained, data, args.work_dir / f"{size}_eval_{label.split()[1]}")
                evals.append({"structures": size, "data": label, **result})
                print(f"{size:>7} eval of {label:<10} {result['wall_s']:7.1f} s  peak RSS {result['peak_rss_mb']:7.0f}"
                      f" MB  forces MAE {result['forces_mae']:.3f} meV/A", flush=True)

    print("\n| structures | mode | startup (s) | configs/s | peak RSS (MB) | at the end: private / file-backed (MB) |"
          "\n| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['structures']:,} | {row['mode']} | {row['startup_s']:.1f} | {row['configs_per_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {row['end_anon_mb']:.0f} / {row['end_file_mb']:.0f} |")
    if evals:
        print("\n| structures | eval of | wall (s) | peak RSS (MB) | private memory at the end (MB) "
              "| forces MAE (meV/Å) |\n| ---: | --- | ---: | ---: | ---: | ---: |")
        for row in evals:
            print(f"| {row['structures']:,} | {row['data']} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} | "
                  f"{row['end_anon_mb']:.0f} | {row['forces_mae']:.3f} |")
    for info in packs.values():
        print(f"pack of {info['structures']:,} structures at {info['cutoff']:g} Å: {info['pack_s']:.1f} s, "
              f"{info['pack_mb']:.1f} MB on disk (extxyz {info['file_mb']:.1f} MB)")
    atomic_write_json(args.out, {"rows": rows, "evals": evals, "packs": packs, "settings": {
        "data": args.data, "sizes": args.sizes, "seconds": args.seconds, "dtype": args.dtype, "model": MODEL,
        "modes": args.modes, "wide_cutoff": args.wide_cutoff,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}})


if __name__ == "__main__":
    run_script(main)

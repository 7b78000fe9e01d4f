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

``pack_s`` and ``pack_mb`` give the one-off cost of ``equiforce pack`` for each size.
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
status = main(["train", sys.argv[1], "--no-progress"])
with open("/proc/self/status") as handle:
    fields = dict(line.split(":", 1) for line in handle)
kb = {name: int(fields[name].split()[0]) for name in ("VmHWM", "RssAnon", "RssFile")}
kb["children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[2], "w").write(json.dumps(kb))
sys.exit(status)
"""


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
    log, peak = out / "stderr.txt", out / "memory_kb.json"
    start = time.perf_counter()
    with open(log, "w") as stderr:
        run = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path), str(peak)], stdout=subprocess.DEVNULL,
                             stderr=stderr)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"training in {out} failed:\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stepped = sum(r["configs_per_s"] * r["time"] for r in records)
    train_time = sum(r["train_time"] for r in records)
    spent = sum(r["time"] for r in records)
    return {"wall_s": wall, "startup_s": wall - spent, "train_time_s": train_time,
            "configs_per_s": stepped / train_time, "epochs": len(records),
            "valid_forces_mae": records[-1].get("valid_forces_mae"),
            **{name: json.loads(peak.read_text())[key] / 1024 for name, key in (
                ("peak_rss_mb", "VmHWM"), ("end_anon_mb", "RssAnon"), ("end_file_mb", "RssFile"),
                ("reader_peak_rss_mb", "children"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="structure files (rMD17 npz, extxyz, ...)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[20000], help="structures per run")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per run (max_time)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/streaming"))
    parser.add_argument("--out", type=Path, default=Path("runs/streaming/results.json"))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    packs: dict[int, dict[str, Any]] = {}
    for size in args.sizes:
        source = joined_file(args.data, size, args.work_dir, args.seed)
        start = time.perf_counter()
        store = args.work_dir / f"structures_{size}.pack"
        index = pack([source], store, cutoff=MODEL["cutoff"], overwrite=True)
        packs[size] = {"pack_s": time.perf_counter() - start,
                       "pack_mb": (sum(s["bytes"] for s in index["shards"]) + index["summary_bytes"]) / 1e6,
                       "file_mb": source.stat().st_size / 1e6, "atoms": index["atoms"], "edges": index["edges"]}
        for mode, train, workers in (("file, in memory", source, 0), ("pack, streamed", store, 0),
                                     ("pack, 1 reader process", store, 1)):
            name = f"{size}_{mode.split(',')[0]}_{workers}"
            result = run_training(train, args.work_dir / name, args.seconds, workers, args.dtype)
            rows.append({"structures": size, "mode": mode, "workers": workers, **result})
            print(f"{size:>7} {mode:<24} startup {result['startup_s']:7.1f} s  {result['configs_per_s']:7.1f} "
                  f"configs/s  peak RSS {result['peak_rss_mb']:7.0f} MB", flush=True)

    print("\n| structures | mode | startup (s) | configs/s | peak RSS (MB) | at the end: private / file-backed (MB) |"
          "\n| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['structures']:,} | {row['mode']} | {row['startup_s']:.1f} | {row['configs_per_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {row['end_anon_mb']:.0f} / {row['end_file_mb']:.0f} |")
    for size, info in packs.items():
        print(f"pack of {size:,} structures: {info['pack_s']:.1f} s, {info['pack_mb']:.1f} MB on disk "
              f"(extxyz {info['file_mb']:.1f} MB)")
    atomic_write_json(args.out, {"rows": rows, "packs": packs, "settings": {
        "data": args.data, "sizes": args.sizes, "seconds": args.seconds, "dtype": args.dtype, "model": MODEL,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}})


if __name__ == "__main__":
    main()

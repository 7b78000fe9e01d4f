"""Packed graph datasets: structures turned into graphs once, stored on disk, and read back lazily.

Why: an in-memory dataset holds every graph on every rank, and a materials database of a million structures does
not fit.  ``equiforce pack`` builds the graphs (neighbour lists at one cutoff, labels in eV and Å) and writes them
into safetensors shards; training memory-maps the shards and reads only the structures of the batch it steps on,
a few kB each, while the page cache keeps what is hot.  Statistics, E0 fits and batch packing come from a
per-structure summary, so starting a run reads no structure.  Loading never unpickles (safetensors + JSON).

A pack directory holds:

* ``index.json`` — format, cutoff, elements, config types, the source files with their SHA-256, the shards with
  their sizes and content digests, and one digest of the whole content (what a resumed training run checks);
* ``shard-NNNNN.safetensors`` — per graph key the tensors of its structures end to end, ``ptr/KEY`` offsets, and
  that shard's summary columns;
* ``summary.safetensors`` — the per-structure columns of the whole pack (:data:`SUMMARY_COLUMNS`, a composition
  matrix over the pack's elements, and where each structure lies);
* ``progress.json`` — only while packing: the finished shards and the input position, so a killed pack resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from equiforce.data import keys as K
from equiforce.data.graph import Graph, config_to_graph
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, DataError

FORMAT = "equiforce-graphs"
MIN_CUTOFF = 0.5  # Å: below it no pair of atoms a potential is trained on is a neighbour
VERSION = 1
INDEX, SUMMARY, PROGRESS, LOCK = "index.json", "summary.safetensors", "progress.json", "pack.lock"
STORED_DTYPES = {"float64": np.float64, "float32": np.float32}
# per structure, in every shard and in summary.safetensors (flags under the graph's own key names)
SUMMARY_COLUMNS = {"n_atoms": np.int64, "n_edges": np.int64, K.ENERGY: np.float64, K.HAS_ENERGY: np.uint8,
                   K.HAS_FORCES: np.uint8, K.HAS_STRESS: np.uint8, K.HAS_HESSIAN: np.uint8, K.WEIGHT: np.float64,
                   "isolated": np.uint8, "force_sq": np.float64, "force_count": np.int64, "frame": np.int64,
                   "source": np.int32}


# the label keys and format of read_configurations, as a pack records them
READER_DEFAULTS = {"energy_key": "energy", "forces_key": "forces", "stress_key": "stress", "virial_key": "virial",
                   "config_type_key": "config_type", "weight_key": "config_weight", "hessian_key": "hessian",
                   "format": None}
# local atom numbers of each edge and its integer cell shifts: stored in the narrowest integer type that holds a
# shard's values (int16 and int8 for molecules and ordinary cells: 7 bytes per edge instead of 40), read back as
# long / float
COMPACT = (K.EDGE_INDEX, K.SHIFTS)
CHUNK = 65536  # structures per chunk when a computation runs over summary columns (bounded memory)


def is_pack(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a packed dataset: a directory with an ``index.json``, or with the ``progress.json`` of an
    unfinished one (so that opening it says to finish it, rather than "not a file")."""
    return Path(path).is_dir() and ((Path(path) / INDEX).is_file() or (Path(path) / PROGRESS).is_file())


def narrowest(values: np.ndarray) -> np.ndarray:
    """Integers in the narrowest signed type that holds them all."""
    largest = int(np.abs(values).max()) if values.size else 0
    for kind in (np.int8, np.int16, np.int32):
        if largest <= np.iinfo(kind).max:
            return values.astype(kind)
    return values.astype(np.int64)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


# ------------------------------------------------------------------------------------------------------- writing
class _ShardBuilder:
    """Graphs of one shard, gathered until it is full."""

    def __init__(self, dtype: type[np.floating]) -> None:
        self.dtype = dtype
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.columns: dict[str, list[Any]] = {name: [] for name in SUMMARY_COLUMNS}
        self.numbers: list[np.ndarray] = []
        self.config_types: list[str] = []
        self.closest: dict[tuple[int, int], float] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.numbers)

    def add(self, graph: Graph, config: Configuration, source: int, isolated: bool) -> None:
        from equiforce.data.stats import closest_pairs

        for key, value in graph.items():
            array = value.numpy()
            if key == K.EDGE_INDEX:
                array = array.T  # [E, 2]: structures end to end along the first axis, like every other key
            if key in COMPACT:
                array = array.astype(np.int64)  # narrowed per shard (payload)
            elif array.dtype.kind == "f":
                array = array.astype(self.dtype)
            self.arrays.setdefault(key, []).append(np.ascontiguousarray(array))
            self.nbytes += array.nbytes
        has_forces = float(graph[K.HAS_FORCES][0]) > 0
        forces = graph[K.FORCES].double()
        row = {"n_atoms": config.n_atoms, "n_edges": int(graph[K.EDGE_INDEX].shape[1]),
               K.ENERGY: float(graph[K.ENERGY][0]), "isolated": int(isolated), K.WEIGHT: float(graph[K.WEIGHT][0]),
               "force_sq": float((forces**2).sum()) if has_forces else 0.0,
               "force_count": forces.numel() if has_forces else 0, "frame": config.frame, "source": source,
               **{flag: int(float(graph[flag][0]) > 0)
                  for flag in (K.HAS_ENERGY, K.HAS_FORCES, K.HAS_STRESS, K.HAS_HESSIAN)}}
        for name, value in row.items():
            self.columns[name].append(value)
        self.numbers.append(np.asarray(config.numbers, dtype=np.int64))
        self.config_types.append(config.config_type)
        for pair, distance in closest_pairs([graph]).items():
            self.closest[pair] = min(self.closest.get(pair, distance), distance)

    def payload(self) -> tuple[bytes, str]:
        """The shard as safetensors bytes (graph tensors, their offsets, the summary columns; the element and
        config-type tables and the closest pairs as metadata), and the SHA-256 of that content
        (the file's bytes are not reproducible: safetensors writes the metadata in a random order)."""
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {}
        for key, parts in self.arrays.items():
            tensors[key] = np.concatenate(parts, axis=0)
            if key in COMPACT:
                tensors[key] = narrowest(tensors[key])
            ptr = np.zeros(len(parts) + 1, dtype=np.int64)
            ptr[1:] = np.cumsum([len(p) for p in parts])
            tensors[f"ptr/{key}"] = ptr
        for name, kind in SUMMARY_COLUMNS.items():
            tensors[f"summary/{name}"] = np.asarray(self.columns[name], dtype=kind)
        elements = sorted({int(z) for numbers in self.numbers for z in numbers})
        column = {z: k for k, z in enumerate(elements)}
        composition = np.zeros((len(self), len(elements)), dtype=np.int32)
        for row, numbers in enumerate(self.numbers):
            np.add.at(composition[row], [column[int(z)] for z in numbers], 1)
        tensors["summary/composition"] = composition
        types = sorted(set(self.config_types))
        number = {name: k for k, name in enumerate(types)}
        tensors["summary/config_type"] = np.asarray([number[t] for t in self.config_types], dtype=np.int32)
        metadata = {"elements": json.dumps(elements), "config_types": json.dumps(types),
                    "closest": json.dumps({f"{a}-{b}": d for (a, b), d in sorted(self.closest.items())})}
        digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
        for name in sorted(tensors):
            digest.update(f"{name}|{tensors[name].dtype.str}|{tensors[name].shape}".encode())
            digest.update(np.ascontiguousarray(tensors[name]).tobytes())
        return save(tensors, metadata=metadata), digest.hexdigest()


def _settings(inputs: Sequence[str | os.PathLike], cutoff: float, dtype: str, reader: Mapping[str, Any],
              shard_mb: float) -> dict[str, Any]:
    from equiforce.utils.digest import file_sha256

    sources = []
    for path in inputs:  # each a file: pack() checked them before creating anything
        sources.append({"path": str(path), "sha256": file_sha256(path), "bytes": Path(path).stat().st_size})
    return {"cutoff": float(cutoff), "dtype": dtype, "reader": dict(reader), "shard_mb": float(shard_mb),
            "sources": sources}


def data_sha256(path: str | os.PathLike) -> str:
    """What identifies a data input: a file's SHA-256, or a pack's content digest (a pack is a directory)."""
    from equiforce.utils.digest import file_sha256

    if is_pack(path):
        return str(json.loads((Path(path) / INDEX).read_text(encoding="utf-8"))["content_sha256"])
    return file_sha256(path)


def _comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as a resume compares them: the inputs by content and size, not by how their paths were written."""
    return {**settings, "sources": [(s.get("sha256"), s.get("bytes")) for s in settings.get("sources", [])]}


def pack(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, cutoff: float,
         reader: Mapping[str, Any] | None = None, dtype: str = "float64", shard_mb: float = 256.0,
         overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build the graphs of every structure of ``inputs`` at ``cutoff`` and write them as a pack into ``out``.

    ``reader`` holds :func:`~equiforce.data.io.read_configurations`' label keys and format.  Shards of about
    ``shard_mb`` MB are written atomically as they fill; a pack that is killed resumes from its last shard when
    run again with the same inputs and options (``progress.json``), and a finished one is refused unless
    ``overwrite``.  ``progress(n)`` is called with the number of structures packed so far.  Returns the index.
    """
    if dtype not in STORED_DTYPES:
        raise ConfigError(f"pack dtype must be one of {sorted(STORED_DTYPES)}, got {dtype!r}")
    if not (MIN_CUTOFF <= cutoff < float("inf")) or not shard_mb > 0:
        raise ConfigError(f"the cutoff must be at least {MIN_CUTOFF} Å and finite, and the shard size positive; got "
                          f"{cutoff} Å and {shard_mb} MB")
    if not inputs:
        raise ConfigError("no input files to pack")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    unknown = sorted(set(reader or {}) - set(READER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown reader option(s) {unknown}; known: {sorted(READER_DEFAULTS)}")
    for path in inputs:  # before anything is created
        if not Path(path).is_file():
            from equiforce.data.io import missing_file

            raise missing_file(path)
    foreign = sorted(p.name for p in out.iterdir() if not _is_pack_file(p.name)) if out.is_dir() else []
    if foreign:  # a pack is not written among a user's own files (--overwrite would not remove them either)
        raise ConfigError(f"{out} holds other files than a pack's ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); give a new or empty directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    reader = {**READER_DEFAULTS, **(reader or {})}  # recorded in full: training compares its data keys with them
    try:
        return _pack_into(out, inputs, cutoff, reader, dtype, shard_mb, overwrite, progress)
    except BaseException:
        if created and not (out / PROGRESS).exists():  # nothing to resume: leave no empty directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _is_pack_file(name: str) -> bool:
    """Whether a file name is one a pack (or its atomic writes' temporaries) uses."""
    return name in (INDEX, SUMMARY, PROGRESS, LOCK) or name.startswith(("shard-", ".shard-", f".{INDEX}",
                                                                        f".{SUMMARY}", f".{PROGRESS}"))


def _pack_into(out: Path, inputs: Sequence[str | os.PathLike], cutoff: float, reader: dict[str, Any], dtype: str,
               shard_mb: float, overwrite: bool, progress: Callable[[int], None] | None) -> dict[str, Any]:
    """:func:`pack`'s work, under the pack's lock."""
    from equiforce.data.io import iter_configurations
    from equiforce.data.stats import is_isolated_atom
    from equiforce.utils.atomic_io import atomic_write_bytes, atomic_write_json
    from equiforce.utils.locking import held_lock

    with held_lock(out / LOCK, "packing"):
        if (out / INDEX).exists() and not overwrite:
            raise ConfigError(f"{out} already holds a finished pack; give another directory or --overwrite")
        if overwrite:  # a finished pack, or an unfinished one made with other inputs or options
            _remove_pack_files(out)
        settings = _settings(inputs, cutoff, dtype, reader, shard_mb)
        state: dict[str, Any] = {"settings": settings, "shards": [], "position": [0, 0]}
        if (out / PROGRESS).exists():
            try:
                saved = json.loads((out / PROGRESS).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {PROGRESS} of an unfinished pack ({err}); pack into a new directory",
                                source=str(out)) from err
            if _comparable(saved.get("settings", {})) != _comparable(settings):
                before, now = _comparable(saved.get("settings", {})), _comparable(settings)
                changed = [k if isinstance(v, dict | list) else f"{k} ({before.get(k)!r}, now {v!r})"
                           for k, v in sorted(now.items()) if before.get(k) != v]
                raise ConfigError(f"{out} holds an unfinished pack made with other {', '.join(changed)}; give the same "
                                  "inputs and options to resume it, another directory, or --overwrite")
            state = {**saved, "settings": settings}  # the paths as given now (the same contents)
            _check_shards(out, state["shards"])
        else:
            _remove_pack_files(out)  # shards of an unfinished pack whose progress file never got written
        done = sum(s["structures"] for s in state["shards"])
        builder = _ShardBuilder(STORED_DTYPES[dtype])
        limit = shard_mb * 1e6

        def flush(position: list[int]) -> None:
            nonlocal builder
            data, content = builder.payload()
            name = shard_name(len(state["shards"]))
            atomic_write_bytes(out / name, data)
            state["shards"].append({"file": name, "structures": len(builder), "bytes": len(data),
                                    "content_sha256": content})
            state["position"] = position
            atomic_write_json(out / PROGRESS, state)
            builder = _ShardBuilder(STORED_DTYPES[dtype])

        first_input, first_frame = state["position"]
        position = [first_input, first_frame]
        for number in range(first_input, len(inputs)):
            start = first_frame if number == first_input else 0
            for config in iter_configurations(inputs[number], **reader, start=start):
                isolated = is_isolated_atom(config)
                if isolated and config.n_atoms != 1:
                    raise DataError(f"labelled as an isolated atom but has {config.n_atoms} atoms",
                                    source=config.source, frame=config.frame, field="config_type")
                builder.add(config_to_graph(config, cutoff, torch.float64), config, number, isolated)
                position = [number, config.frame + 1]
                done += 1
                if progress is not None:
                    progress(done)
                if builder.nbytes >= limit:
                    flush(position)
            position = [number + 1, 0]
        if len(builder):
            flush(position)
        if not state["shards"]:
            raise DataError("no structures to pack", source=str(inputs[0]))
        index = _finish(out, state)
        (out / PROGRESS).unlink(missing_ok=True)
        return index


def _remove_pack_files(out: Path) -> None:
    for path in [out / INDEX, out / SUMMARY, out / PROGRESS, *out.glob("shard-*.safetensors")]:
        path.unlink(missing_ok=True)


def _check_shards(out: Path, shards: Sequence[Mapping[str, Any]]) -> None:
    for shard in shards:
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard {shard['file']} is missing or has another size than when it was written "
                            f"({shard['bytes']} bytes); pack into a new directory", source=str(out))


def _finish(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Join the shards' summaries into ``summary.safetensors`` and write ``index.json`` (last: it marks the pack
    as complete)."""
    from safetensors import safe_open
    from safetensors.numpy import save

    from equiforce.utils.atomic_io import atomic_write_bytes, atomic_write_json

    parts: list[dict[str, np.ndarray]] = []
    metas: list[dict[str, Any]] = []
    for shard in state["shards"]:
        with safe_open(str(out / shard["file"]), framework="numpy") as handle:
            meta = handle.metadata()
            metas.append({k: json.loads(v) for k, v in meta.items()})
            parts.append({k.removeprefix("summary/"): handle.get_tensor(k) for k in handle.keys()
                          if k.startswith("summary/")})
    elements = sorted({z for meta in metas for z in meta["elements"]})
    config_types = sorted({t for meta in metas for t in meta["config_types"]})
    type_number = {name: k for k, name in enumerate(config_types)}
    closest: dict[str, float] = {}
    largest = max((int(part["composition"].max()) for part in parts if part["composition"].size), default=0)
    narrow = np.uint16 if largest <= np.iinfo(np.uint16).max else np.int32  # 2 bytes per structure and element
    columns: dict[str, list[np.ndarray]] = {name: [] for name in [*SUMMARY_COLUMNS, "config_type", "composition",
                                                                   "shard", "row"]}
    for number, (part, meta) in enumerate(zip(parts, metas)):
        count = len(part["n_atoms"])
        for name in SUMMARY_COLUMNS:
            columns[name].append(part[name])
        remap = np.asarray([type_number[t] for t in meta["config_types"]], dtype=np.int32)
        columns["config_type"].append(remap[part["config_type"]])
        composition = np.zeros((count, len(elements)), dtype=narrow)
        composition[:, np.searchsorted(elements, meta["elements"])] = part["composition"]
        columns["composition"].append(composition)
        columns["shard"].append(np.full(count, number, dtype=np.int32))
        columns["row"].append(np.arange(count, dtype=np.int64))
        for pair, distance in meta["closest"].items():
            closest[pair] = min(closest.get(pair, distance), distance)
    summary = {name: np.concatenate(values) for name, values in columns.items()}
    payload = save(summary)
    atomic_write_bytes(out / SUMMARY, payload)
    from equiforce import __version__

    content = hashlib.sha256(json.dumps([state["settings"]["cutoff"], state["settings"]["dtype"],
                                         [s["content_sha256"] for s in state["shards"]]]).encode()).hexdigest()
    counts = np.bincount(summary["source"], minlength=len(state["settings"]["sources"]))
    index = {"format": FORMAT, "version": VERSION, "equiforce": __version__,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "structures": int(len(summary["row"])),
             "atoms": int(summary["n_atoms"].sum()), "edges": int(summary["n_edges"].sum()),
             "cutoff": state["settings"]["cutoff"], "dtype": state["settings"]["dtype"],
             "reader": state["settings"]["reader"], "elements": elements, "config_types": config_types,
             "closest_pairs": dict(sorted(closest.items())),
             "sources": [{**s, "structures": int(n)} for s, n in zip(state["settings"]["sources"], counts)],
             "shards": state["shards"], "summary_bytes": len(payload), "content_sha256": content}
    atomic_write_json(out / INDEX, index)
    return index


# ------------------------------------------------------------------------------------------------------- reading
class _Shard(BaseModel):
    file: str = Field(pattern=r"^shard-\d{5}\.safetensors$")
    structures: int = Field(ge=1)
    bytes: int = Field(ge=1)
    content_sha256: str


class _Source(BaseModel):
    path: str
    sha256: str
    bytes: int
    structures: int


class PackIndex(BaseModel):
    """``index.json``, checked when a pack is opened (a damaged or hand-edited index is named, not a traceback)."""

    format: Literal["equiforce-graphs"]
    version: int
    equiforce: str
    created: str
    structures: int = Field(ge=1)
    atoms: int
    edges: int
    cutoff: float = Field(ge=MIN_CUTOFF, allow_inf_nan=False)
    dtype: Literal["float64", "float32"]
    reader: dict[str, str | None]
    elements: list[int] = Field(min_length=1)
    config_types: list[str] = Field(min_length=1)
    closest_pairs: dict[str, float]
    sources: list[_Source] = Field(min_length=1)
    shards: list[_Shard] = Field(min_length=1)
    summary_bytes: int
    content_sha256: str


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                       "U16": "<u2", "BOOL": "?"}


def memory_mapped(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps (what is read is what is touched). The format is
    an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte ranges, then the data."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= 100_000_000:
            raise ValueError(f"header length {length} is not that of a safetensors file")
        header = json.loads(handle.read(length))
    base = 8 + length
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
        start, stop = entry["data_offsets"]
        if stop - start != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name}: byte range {start}-{stop} does not hold shape {shape}")
        arrays[name] = (np.zeros(shape, dtype) if stop == start
                        else np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape))
    return arrays


def _edge_lengths(positions: np.ndarray, edges: np.ndarray, shifts: np.ndarray, cells: np.ndarray,
                  structure: np.ndarray) -> np.ndarray:
    """Lengths of ``edges`` (``[E, 2]`` atom rows of ``positions``), each with its structure's cell, in float64
    (the precision the neighbour list was built in)."""
    positions = positions.astype(np.float64, copy=False)
    offsets = np.einsum("ei,eij->ej", shifts.astype(np.float64), cells.astype(np.float64)[structure])
    return np.linalg.norm(positions[edges[:, 1]] - positions[edges[:, 0]] + offsets, axis=1)


def _edges_within(shard: Mapping[str, tuple[np.ndarray, np.ndarray]], cutoff: float) -> np.ndarray:
    """Per structure of a shard, its number of edges shorter than ``cutoff`` (vectorised over the shard)."""
    positions, atom_ptr = shard[K.POSITIONS]
    edges, edge_ptr = shard[K.EDGE_INDEX]
    shifts, _ = shard[K.SHIFTS]
    cells, _ = shard[K.CELL]
    rows = len(atom_ptr) - 1
    structure = np.repeat(np.arange(rows), np.diff(edge_ptr))
    total = np.zeros(rows, dtype=np.int64)
    step = 1 << 20  # edges at a time: bounded scratch memory for a shard of many edges
    for start in range(0, len(structure), step):
        part = structure[start:start + step]
        local = np.asarray(edges[start:start + step], dtype=np.int64) + atom_ptr[part][:, None]
        length = _edge_lengths(np.asarray(positions), local, np.asarray(shifts[start:start + step]),
                               np.asarray(cells).reshape(-1, 3, 3), part)
        total += np.bincount(part[length < cutoff], minlength=rows)
    return total


class GraphStore(Sequence[Graph]):
    """The graphs of a pack (or a subset of them), read from the memory-mapped shards when asked for.

    Behaves as a sequence of graphs, so code written for a list of graphs runs on it; a slice is a store over
    the selected structures.  Summary columns (:meth:`column`) answer questions about the structures without
    reading them.  Config-type ``type_weights`` multiply the loss weights as they are read, as for in-memory
    training graphs.  Open shard handles are per process (a DataLoader worker opens its own).
    """

    def __init__(self, root: Path, index: dict[str, Any], summary: dict[str, np.ndarray], indices: np.ndarray,
                 type_weights: Mapping[str, float] | None = None, cache: dict[str, Any] | None = None,
                 edge_cutoff: float | None = None, weight_factors: np.ndarray | None = None) -> None:
        self.root, self.index, self._summary = root, index, summary
        self.indices = np.asarray(indices, dtype=np.int64)
        self.type_weights = dict(type_weights or {})
        # open shards (and edge counts at a smaller cutoff), shared with the subsets of this store (a slice per
        # validation batch opens nothing)
        self._cache: dict[str, Any] = cache if cache is not None else {"pid": os.getpid(), "shards": {}}
        self._float_dtype = torch.float64 if index["dtype"] == "float64" else torch.float32
        self.edge_cutoff = edge_cutoff  # None: the graphs' edges as packed; else only those shorter than this
        self.weight_factors = weight_factors  # None, or a loss-weight factor per packed structure (all of them)

    def _derived(self, indices: np.ndarray | None = None, type_weights: Mapping[str, float] | None = None,
                 edge_cutoff: float | None | Literal["same"] = "same",
                 weight_factors: np.ndarray | None = None) -> GraphStore:
        """A store over the same pack and open shards, with some of its selection, weights or edge cutoff changed."""
        return GraphStore(self.root, self.index, self._summary, self.indices if indices is None else indices,
                          self.type_weights if type_weights is None else type_weights, self._cache,
                          self.edge_cutoff if edge_cutoff == "same" else edge_cutoff,
                          self.weight_factors if weight_factors is None else weight_factors)

    @classmethod
    def open(cls, root: str | os.PathLike) -> GraphStore:
        """Open a pack, checking its index and that its files are there with the sizes written."""
        root = Path(root)
        where = str(root)
        if not (root / INDEX).is_file():
            raise DataError(f"not a packed dataset (no {INDEX}; an unfinished pack has a {PROGRESS}: run equiforce "
                            "pack again to finish it)", source=where)
        try:
            index = json.loads((root / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {INDEX}: {err}", source=where) from err
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{INDEX} is not an equiforce pack index", source=where, field="format")
        if index.get("version") != VERSION:
            raise DataError(f"pack version {index.get('version')} is not readable by this equiforce (reads "
                            f"{VERSION}); pack the data again", source=where, field="version")
        try:
            index = PackIndex.model_validate(index).model_dump()
        except ValidationError as err:
            problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:3])
            raise DataError(f"{INDEX} is damaged ({problem}); pack the data again", source=where) from None
        _check_shards(root, index["shards"])
        path = root / SUMMARY
        if not path.is_file() or path.stat().st_size != index["summary_bytes"]:
            raise DataError(f"{SUMMARY} is missing or has another size than when it was written", source=where)
        try:
            summary = memory_mapped(path)
        except Exception as err:  # noqa: BLE001 - any failure here means a damaged file
            raise DataError(f"cannot read {SUMMARY}: {err}", source=where) from err
        missing = sorted({*SUMMARY_COLUMNS, "composition", "config_type", "shard", "row"} - set(summary))
        if missing:
            raise DataError(f"{SUMMARY} lacks the columns {missing}", source=where)
        if len(summary["row"]) != index["structures"]:
            raise DataError(f"{SUMMARY} lists {len(summary['row'])} structures, the index {index['structures']}",
                            source=where)
        # every number in the summary must point into the index's tables (one pass over four small columns)
        for column, table in (("shard", "shards"), ("config_type", "config_types"), ("source", "sources")):
            values = summary[column]
            if len(values) and not 0 <= int(values.min()) <= int(values.max()) < len(index[table]):
                raise DataError(f"{SUMMARY} and {INDEX} disagree: {column} numbers outside the {len(index[table])} "
                                f"{table} listed; pack the data again", source=where)
        if summary["composition"].shape[1:] != (len(index["elements"]),):
            raise DataError(f"{SUMMARY} and {INDEX} disagree on the elements; pack the data again", source=where)
        return cls(root, index, summary, np.arange(index["structures"]))

    # -- the sequence
    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return self._derived(self.indices[item])
        if isinstance(item, np.ndarray | list | range):
            return self.subset(np.asarray(item, dtype=np.int64))
        return self._graph(int(self.indices[item]))

    def __iter__(self) -> Iterator[Graph]:
        for k in self.indices:
            yield self._graph(int(k))

    def subset(self, positions: Sequence[int] | np.ndarray) -> GraphStore:
        """The structures at ``positions`` of this store, in that order."""
        return self._derived(self.indices[np.asarray(positions, dtype=np.int64)])

    def with_type_weights(self, type_weights: Mapping[str, float]) -> GraphStore:
        return self._derived(type_weights=dict(type_weights))

    def extended(self, other: GraphStore) -> GraphStore:
        """This store's structures followed by ``other``'s (of the same pack), read with this store's weights and
        cutoff."""
        if other.root != self.root or other.index["content_sha256"] != self.index["content_sha256"]:
            raise ValueError("only stores of the same pack can be joined")
        return self._derived(np.concatenate([self.indices, other.indices]))

    def with_weight_factors(self, factors: Sequence[float] | np.ndarray) -> GraphStore:
        """This store with each structure's loss weight times ``factors`` (one per position; e.g. a bootstrap
        resample's counts), kept by its slices and subsets.  Structures outside this store keep factor 1."""
        factors = np.asarray(factors, dtype=np.float64)
        if factors.shape != (len(self),):
            raise ValueError(f"{len(self)} weight factors needed, got shape {factors.shape}")
        full = (np.ones(len(self._summary["row"])) if self.weight_factors is None
                else self.weight_factors.copy())
        full[self.indices] = factors
        return self._derived(weight_factors=full)

    def within(self, cutoff: float) -> GraphStore:
        """This store with only the edges shorter than ``cutoff`` in its graphs (and its edge counts and closest
        pairs at that cutoff): a pack made at the largest cutoff one means to try serves every smaller one."""
        packed = float(self.index["cutoff"])
        if cutoff > packed + 1e-9:
            raise DataError(f"was packed with neighbours within {packed:g} Å, fewer than a {cutoff:g} Å cutoff needs; "
                            f"pack again with --cutoff {cutoff:g} (or more)", source=str(self.root))
        return self._derived(edge_cutoff=None if cutoff > packed - 1e-9 else float(cutoff))

    # -- what the summary answers
    @property
    def cutoff(self) -> float:
        """The cutoff of the graphs this store gives: the pack's, or the smaller one of :meth:`within`."""
        return float(self.index["cutoff"]) if self.edge_cutoff is None else self.edge_cutoff

    def column(self, name: str) -> np.ndarray:
        """A per-structure summary column over this store's structures (see :data:`SUMMARY_COLUMNS`, plus
        ``config_type`` as a number into ``index["config_types"]``); for ``composition`` see :meth:`chunks`."""
        return self._full_column(name)[self.indices]

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[np.ndarray]:
        """A summary column over this store's structures, ``size`` structures at a time: for the composition
        matrix (``[S, len(elements)]``), which over a million structures and many elements is not copied whole."""
        column = self._full_column(name)
        for start in range(0, len(self.indices), size):
            yield column[self.indices[start:start + size]]

    def _full_column(self, name: str) -> np.ndarray:
        if name == "n_edges" and self.edge_cutoff is not None:
            return self._edge_counts()
        return self._summary[name]

    def _edge_counts(self) -> np.ndarray:
        """Every packed structure's number of edges shorter than :attr:`edge_cutoff`: one pass over the shards,
        a shard at a time, the first time they are asked for (then kept with the open shards)."""
        key = f"n_edges<{self.edge_cutoff!r}"
        if key not in self._cache:
            counts = [_edges_within(self._shard(number), self.edge_cutoff)
                      for number in range(len(self.index["shards"]))]
            starts = np.concatenate([[0], np.cumsum([len(c) for c in counts])])
            self._cache[key] = np.concatenate(counts)[starts[self._summary["shard"]] + self._summary["row"]]
        return self._cache[key]

    @property
    def elements(self) -> list[int]:
        """The pack's elements (the columns of ``column("composition")``)."""
        return list(self.index["elements"])

    def elements_present(self) -> list[int]:
        present = np.zeros(len(self.elements), dtype=bool)
        for chunk in self.chunks("composition"):
            present |= chunk.any(axis=0)
        return [z for z, p in zip(self.elements, present) if p]

    def holding(self, z: int) -> np.ndarray:
        """The positions of this store's structures that hold element ``z`` (from the summary)."""
        if z not in self.elements:
            return np.zeros(0, dtype=np.int64)
        column = self.elements.index(z)
        return np.flatnonzero(np.concatenate([chunk[:, column] for chunk in self.chunks("composition")] or [[]]))

    def config_types_present(self) -> set[str]:
        return {self.index["config_types"][k] for k in np.unique(self.column("config_type"))}

    def labelled(self, flag: str) -> bool:
        """Whether any structure carries the label of ``flag`` (``K.HAS_ENERGY``, ``K.HAS_FORCES``, ...)."""
        return bool(self.column(flag).any())

    def closest_pairs(self) -> dict[tuple[int, int], float]:
        """The shortest distance of each element pair over the whole pack, among its edges at :attr:`cutoff`."""
        pairs = {}
        for pair, distance in self.index["closest_pairs"].items():
            low, high = pair.split("-")
            if float(distance) < self.cutoff:
                pairs[(int(low), int(high))] = float(distance)
        return pairs

    def content_sha256(self) -> str:
        """The pack's content digest combined with the selection, weights and edge cutoff: what a resumed run
        compares."""
        digest = hashlib.sha256(self.index["content_sha256"].encode())
        digest.update(self.indices.tobytes())
        digest.update(json.dumps(self.type_weights, sort_keys=True).encode())
        if self.edge_cutoff is not None:
            digest.update(f"within {self.edge_cutoff!r}".encode())
        if self.weight_factors is not None:
            digest.update(self.weight_factors[self.indices].tobytes())
        return digest.hexdigest()

    # -- reading
    def _shard(self, number: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A shard's graph keys, each as its memory-mapped data and offsets (mapped once per process)."""
        cache = self._cache
        if cache["pid"] != os.getpid():  # a forked worker: mappings and handles are opened afresh
            cache["pid"], cache["shards"] = os.getpid(), {}
        shards = cache["shards"]
        if number not in shards:
            path = self.root / self.index["shards"][number]["file"]
            try:
                arrays = memory_mapped(path)
                shards[number] = {name.removeprefix("ptr/"): (arrays[name.removeprefix("ptr/")], np.asarray(ptr))
                                  for name, ptr in arrays.items() if name.startswith("ptr/")}
            except Exception as err:  # noqa: BLE001 - any failure here means a damaged shard
                raise DataError(f"cannot read {path.name}: {err}", source=str(self.root)) from err
        return shards[number]

    def _graph(self, k: int) -> Graph:
        row = int(self._summary["row"][k])
        graph: Graph = {}
        for key, (data, ptr) in self._shard(int(self._summary["shard"][k])).items():
            tensor = torch.from_numpy(np.array(data[ptr[row]:ptr[row + 1]]))  # a copy: the map stays read-only
            if key == K.EDGE_INDEX:
                tensor = tensor.T.long().contiguous()
            elif key == K.SHIFTS:
                tensor = tensor.to(self._float_dtype)
            graph[key] = tensor
        if self.edge_cutoff is not None:
            keep = torch.from_numpy(_edge_lengths(graph[K.POSITIONS].numpy(), graph[K.EDGE_INDEX].numpy().T,
                                                  graph[K.SHIFTS].numpy(), graph[K.CELL].numpy(),
                                                  np.zeros(int(graph[K.EDGE_INDEX].shape[1]), dtype=np.int64))
                                    < self.edge_cutoff)
            graph[K.EDGE_INDEX] = graph[K.EDGE_INDEX][:, keep].contiguous()
            graph[K.SHIFTS] = graph[K.SHIFTS][keep]
        factor = 1.0 if self.weight_factors is None else float(self.weight_factors[k])
        if self.type_weights:
            name = self.index["config_types"][int(self._summary["config_type"][k])]
            factor *= self.type_weights.get(name, 1.0)
        if factor != 1.0:
            graph[K.WEIGHT] = graph[K.WEIGHT] * factor
        return graph

    def check_readable(self) -> None:
        """Map every shard this store reads (its header parsed): a damaged shard is a :class:`DataError` now, not
        when a batch or an evaluation at the end of a run first reads it.  Contents are not read."""
        for number in np.unique(self._summary["shard"][self.indices]):
            self._shard(int(number))

    def configuration(self, position: int) -> Configuration:
        """Structure ``position`` of this store as a :class:`Configuration`, its source file and frame those it
        was packed from (so errors name where it came from)."""
        k = int(self.indices[position])
        g = self._graph(k)
        n = int(g[K.N_ATOMS][0])
        has = {flag: float(g[flag][0]) > 0 for flag in (K.HAS_ENERGY, K.HAS_FORCES, K.HAS_STRESS, K.HAS_HESSIAN)}
        as64 = lambda t: t.double().numpy()  # noqa: E731
        return Configuration(
            numbers=g[K.NUMBERS].numpy().copy(), positions=as64(g[K.POSITIONS]), cell=as64(g[K.CELL][0]),
            pbc=g[K.PBC][0].numpy().copy(), energy=float(g[K.ENERGY][0]) if has[K.HAS_ENERGY] else None,
            forces=as64(g[K.FORCES]) if has[K.HAS_FORCES] else None,
            stress=as64(g[K.STRESS][0]) if has[K.HAS_STRESS] else None,
            hessian=as64(g[K.HESSIAN_LABEL]).reshape(3 * n, 3 * n) if has[K.HAS_HESSIAN] else None,
            config_type=self.index["config_types"][int(self._summary["config_type"][k])],
            weight=float(self._summary[K.WEIGHT][k]),
            source=self.index["sources"][int(self._summary["source"][k])]["path"],
            frame=int(self._summary["frame"][k]))

    def __getstate__(self) -> dict[str, Any]:
        """For reader processes started by spawn: neither open handles nor the summary's contents travel (a pickled
        memory map would copy its data); the worker maps the summary again."""
        state = dict(self.__dict__)
        state["_cache"] = {"pid": None, "shards": {}}
        state["_summary"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._summary = memory_mapped(self.root / SUMMARY)

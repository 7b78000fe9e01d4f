"""Readers from files to :class:`Configuration` lists, in equiforce units (Å, eV, eV/Å, eV/Å³).

Units are converted here, once, so nothing downstream has to know where data came from.  Every
problem with the input is raised as :class:`DataError` naming the file, the frame and the field,
because a numpy/ASE traceback from deep inside training does not tell the user what to fix.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.formats import string2index

from equiforce.data.structure import Configuration, full_to_voigt, voigt_to_full
from equiforce.errors import DataError

if TYPE_CHECKING:
    from equiforce.data.packed import GraphStore

KCAL_PER_MOL = units.kcal / units.mol  # eV per (kcal/mol)

# rMD17 layout first, then the original MD17 (sGDML) names
_NPZ_KEYS = {
    "numbers": ("nuclear_charges", "z"),
    "positions": ("coords", "R"),
    "energy": ("energies", "E"),
    "forces": ("forces", "F"),
}


def read_configurations(path: str | os.PathLike, *, energy_key: str = "energy", forces_key: str = "forces",
                        stress_key: str = "stress", virial_key: str = "virial",
                        config_type_key: str = "config_type", weight_key: str = "config_weight",
                        hessian_key: str = "hessian", index: str | int = ":", format: str | None = None,
                        require_energy: bool = True, require_forces: bool = False) -> list[Configuration]:
    """Read labelled configurations from any supported file.

    ``.npz`` is read as rMD17/MD17 (kcal/mol converted to eV), ``.db`` as an ASE database and
    everything else with ``ase.io.read`` (extxyz and every ASE format).  Labels are looked up
    under the given keys in ``atoms.info``/``atoms.arrays`` and then in the attached
    calculator's results (where ASE's extxyz reader puts ``energy``/``forces``/``stress``).

    A Hessian label (eV/Å²) is read from a per-atom array of shape ``[N, 9N]`` (atom *i*'s three rows of the
    ``[3N, 3N]`` matrix, as :func:`write_extxyz` writes it) or from ``info`` (``[3N, 3N]`` or flat).
    """
    source = str(path)
    from equiforce.data.packed import is_pack

    if is_pack(path):  # a packed dataset (equiforce pack): its structures, labelled as when they were packed
        keys = dict(energy_key=energy_key, forces_key=forces_key, stress_key=stress_key, virial_key=virial_key,
                    config_type_key=config_type_key, weight_key=weight_key, hessian_key=hessian_key)
        return _read_pack(path, index, keys, require_forces=require_forces)
    if not Path(path).is_file():
        raise missing_file(path)
    fmt = (format or "").lower()
    suffix = Path(path).suffix.lower()
    keys = dict(energy_key=energy_key, forces_key=forces_key, stress_key=stress_key, virial_key=virial_key,
                config_type_key=config_type_key, weight_key=weight_key, hessian_key=hessian_key)
    required = dict(require_energy=require_energy, require_forces=require_forces)
    if fmt in ("npz", "rmd17", "md17") or (not fmt and suffix == ".npz"):
        _check_npz_keys(keys, source)
        configs = _read_npz(source, index, **required)
    elif fmt == "db" or (not fmt and suffix == ".db"):
        configs = _read_db(source, index, keys, required)
    else:
        configs = _read_ase(source, index, format, keys, required)
    if not configs:
        raise DataError("file contains no configurations", source=source)
    return configs


def iter_configurations(path: str | os.PathLike, *, energy_key: str = "energy", forces_key: str = "forces",
                        stress_key: str = "stress", virial_key: str = "virial",
                        config_type_key: str = "config_type", weight_key: str = "config_weight",
                        hessian_key: str = "hessian", format: str | None = None, require_energy: bool = True,
                        require_forces: bool = False, start: int = 0) -> Iterator[Configuration]:
    """:func:`read_configurations` one structure at a time, for files larger than memory (``equiforce pack``).

    ASE formats are streamed frame by frame (``ase.io.iread``) and ASE databases row by row; npz files are read
    whole (numpy loads an archive's arrays whole).  ``start`` skips that many frames (a pack that resumes).  Frame
    numbers in errors count from the start of the file.
    """
    source = str(path)
    if not Path(path).is_file():
        raise missing_file(path)
    keys = dict(energy_key=energy_key, forces_key=forces_key, stress_key=stress_key, virial_key=virial_key,
                config_type_key=config_type_key, weight_key=weight_key, hessian_key=hessian_key)
    required = dict(require_energy=require_energy, require_forces=require_forces)
    fmt = (format or "").lower()
    suffix = Path(path).suffix.lower()
    if fmt in ("npz", "rmd17", "md17") or (not fmt and suffix == ".npz"):
        yield from read_configurations(path, **keys, **required, format=format)[start:]
        return
    database = fmt == "db" or (not fmt and suffix == ".db")
    frame = start
    try:
        for atoms in _db_rows(source, start) if database else _frames_from(source, start, format):
            yield _atoms_to_config(atoms, source, frame, **keys, **required)
            frame += 1
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - ASE raises many types for a corrupt file; all mean "cannot read"
        what = "ASE database" if database else "structures"
        raise DataError(f"cannot read {what}: {type(err).__name__}: {err}", source=source, frame=frame) from err
    if frame == 0:
        raise DataError("file contains no configurations", source=source)


def _frames_from(source: str, start: int, format: str | None) -> Iterator[Atoms]:
    """Frames of an ASE-readable file from frame ``start`` on.  Formats with an index (extxyz, traj) seek there;
    the others, which ASE reads only from their first frame (POSCAR, cif, res, ...), are read and skipped."""
    from ase.io import iread

    if start == 0:
        yield from iread(source, index=":", format=format)
        return
    try:
        frames = iread(source, index=f"{start}:", format=format)
        first = next(frames, None)
    except (AssertionError, ValueError, TypeError, IndexError):  # a reader that cannot start mid-file
        frames = itertools.islice(iread(source, index=":", format=format), start, None)
        first = next(frames, None)
    if first is not None:
        yield first
        yield from frames


def _db_rows(source: str, start: int) -> Iterator[Atoms]:
    """Rows of an ASE database from row ``start`` on (in id order, as :func:`_read_db`), one at a time."""
    import ase.db

    _check_database_file(source)
    with ase.db.connect(source, type="db") as db:
        offset = start
        while True:  # ASE's SQLite backend fetches a whole selection at once: 256 rows at a time
            rows = list(db.select(offset=offset, limit=256))
            yield from (_row_atoms(row) for row in rows)
            if len(rows) < 256:
                return
            offset += len(rows)


def _check_database_file(source: str) -> None:
    """An empty file is refused before ``ase.db.connect``, which would write a database schema into it."""
    if Path(source).stat().st_size == 0:
        raise DataError("file is empty (not an ASE database)", source=source)


def _row_atoms(row: Any) -> Atoms:
    """A database row as Atoms with its key-value pairs and data in ``info`` (where label keys are looked up)."""
    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    atoms.info.update(row.get("data") or {})
    return atoms


def label_names(path: str | os.PathLike, format: str | None = None) -> list[str]:
    """The names a file's first frame carries (per-atom arrays, info entries, stored calculator results), or an
    npz file's arrays: what a label key that found nothing could have been.  Empty when that cannot be read."""
    source, fmt = str(path), (format or "").lower()
    try:
        if fmt in ("npz", "rmd17", "md17") or (not fmt and Path(source).suffix.lower() == ".npz"):
            with np.load(source, allow_pickle=False) as data:
                return sorted(data.files)
        atoms = read_atoms(source, 0, format)[0]
    except Exception:  # noqa: BLE001 - only a hint for an error message that is raised anyway
        return []
    return _names_in(atoms)


def write_extxyz(configs: Sequence[Configuration], path: str | os.PathLike) -> None:
    """Write configurations as extxyz with a SinglePointCalculator, the layout ``read_configurations`` reads."""
    from ase.io import write

    frames = []
    for c in configs:
        atoms = c.to_atoms()
        results: dict[str, Any] = {}
        if c.energy is not None:
            results["energy"] = float(c.energy)
        if c.forces is not None:
            results["forces"] = np.asarray(c.forces, dtype=np.float64)
        if c.stress is not None:
            results["stress"] = full_to_voigt(c.stress)
        if c.hessian is not None:  # per atom: its three rows of the [3N, 3N] matrix
            atoms.arrays["hessian"] = np.asarray(c.hessian, dtype=np.float64).reshape(c.n_atoms, 9 * c.n_atoms)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info["config_type"] = c.config_type
        atoms.info["config_weight"] = float(c.weight)
        frames.append(atoms)
    write(str(path), frames, format="extxyz")


# ---------------------------------------------------------------------------------------------
# ASE formats


def _frame_numbers(index: str | int, count: int, total: int | None, source: str) -> list[int]:
    """Frame numbers in the file of the frames an index selects.

    With ``total`` known, from ``range(total)``; otherwise (non-negative index only) the ``count``
    frames ASE returned for it.
    """
    sel = string2index(index) if isinstance(index, str) else index
    if total is not None:
        try:
            frames = range(total)[sel]
        except IndexError as err:
            raise DataError(f"index {index!r} is out of range for {total} frames", source=source) from err
        return [frames] if isinstance(frames, int) else list(frames)
    if isinstance(sel, int):
        return [sel] * count
    return [(sel.start or 0) + k * (sel.step or 1) for k in range(count)]


def _check_index(index: str | int, source: str) -> int | slice:
    sel = string2index(index) if isinstance(index, str) else index
    if not isinstance(sel, int | slice):  # string2index passes anything it cannot parse through as a string
        raise DataError(f"index {index!r} is neither a frame number nor a slice (e.g. 0, -1, ':', '10:20', '::5')",
                        source=source)
    return sel


def _read_ase(source: str, index: str | int, format: str | None, keys: dict, required: dict) -> list[Configuration]:
    sel = _check_index(index, source)
    # counting from the end needs the number of frames to report true frame numbers: read all
    from_end = sel < 0 if isinstance(sel, int) else any((v or 0) < 0 for v in (sel.start, sel.stop, sel.step))
    frames = read_atoms(source, ":" if from_end else index, format)
    if from_end:
        numbers = _frame_numbers(index, 0, len(frames), source)
        frames = [frames[k] for k in numbers]
    else:
        numbers = _frame_numbers(index, len(frames), None, source)
    return [_atoms_to_config(atoms, source, frame, **keys, **required) for atoms, frame in zip(frames, numbers)]


def read_atoms(source: str | os.PathLike, index: str | int = ":", format: str | None = None) -> list[Atoms]:
    """``ase.io.read`` as a list, its failures raised as :class:`DataError` naming the file and the first
    frame that does not parse (ASE raises many exception types for a corrupt file; all mean "cannot read")."""
    from ase.io import read

    from equiforce.data.packed import is_pack

    if is_pack(source):  # a pack's structures (md, relax and learn start from them), without their labels
        return [config.to_atoms() for config in read_configurations(source, index=index)]
    if format is None and Path(source).is_dir() and not (Path(source) / "metadata.json").is_file():
        raise missing_file(source)  # a directory ASE would only misread (an ASE BundleTrajectory has metadata.json)
    try:
        frames = read(source, index=index, format=format)
    except (StopIteration, IndexError) as err:  # an index past the end (ASE's own words are empty or cryptic)
        scan = _scan_frames(source, format)
        total = scan[0] if scan is not None and scan[0] > 0 else None
        if total is None:
            raise DataError(f"cannot read structures: {type(err).__name__}: {err}", source=str(source)) from err
        raise DataError(f"index {index!r} is out of range: the file has {total} frames", source=str(source)) from err
    except Exception as err:  # noqa: BLE001 - see the docstring
        frame = _unreadable_frame(source, format)
        guess = ""
        if format is None and frame == 0:  # the first frame fails: perhaps the name made ASE guess a wrong format
            guess = (f" (read as format {_guessed_format(source)!r}, guessed from the file; name the format "
                     "if that is wrong: data.format in a training config, --format of eval and pack; elsewhere "
                     "give the file its format's suffix, e.g. .extxyz)")
        raise DataError(f"cannot read structures: {type(err).__name__}: {err}{guess}", source=str(source),
                        frame=frame) from err
    return [frames] if isinstance(frames, Atoms) else list(frames)


def check_structures(frames: Sequence[Atoms], source: str | os.PathLike, cutoff: float) -> None:
    """The checks a training frame gets, for structures a simulation or a learning run starts from: atoms present,
    finite positions and cell, a usable periodic cell, no two atoms at the same place — each a :class:`DataError`
    naming the file and frame (position in the selection read), found before any step or oracle call."""
    from equiforce.data.graph import config_to_graph
    from equiforce.data.structure import Configuration

    for frame, atoms in enumerate(frames):
        _check_atomic_numbers(atoms.numbers, {"source": str(source), "frame": frame})
        config_to_graph(Configuration.from_atoms(atoms, source=str(source), frame=frame), cutoff)


def missing_file(path: str | os.PathLike) -> DataError:
    """The error for a structure-file input that is no file: missing, a pack where a file is read, or another
    directory (a run directory, a typo)."""
    from equiforce.data.packed import is_pack

    if not Path(path).exists():
        return DataError("file not found", source=str(path))
    if is_pack(path):
        return DataError("is a packed dataset, not a structure file: packs are made from structure files (train, "
                         "eval and the other commands take the pack itself)", source=str(path))
    if Path(path).is_dir():
        return DataError("is a directory, neither a structure file nor a pack (a pack holds index.json)",
                         source=str(path))
    return DataError("not a regular file", source=str(path))


def _guessed_format(source: str | os.PathLike) -> str | None:
    from ase.io.formats import filetype

    try:
        return filetype(str(source), read=True, guess=True)
    except Exception:  # noqa: BLE001 - a hint for an error message only
        return None


def _scan_frames(source: str | os.PathLike, format: str | None = None) -> tuple[int, bool] | None:
    """Frames that parse, read one by one, and whether a parse error stopped the reading; ``None`` when the
    file cannot be opened or its format is unknown.  Only run after a failure (a count, the broken frame)."""
    from ase.io import iread
    from ase.io.formats import UnknownFileTypeError

    count = 0
    try:
        for _ in iread(source, index=":", format=format):
            count += 1
    # not OSError as a whole: ASE's XYZError (a truncated frame) is one, and that frame is what to name
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnknownFileTypeError):
        return None
    except Exception:  # noqa: BLE001 - any parse error marks the frame; the caller reports the first one
        return count, True
    return count, False


def _unreadable_frame(source: str | os.PathLike, format: str | None = None) -> int | None:
    """The number of the first frame ASE cannot parse, so an error can say where a long file is broken (ASE's
    exceptions name a token, not its place); ``None`` when every frame reads or the file cannot be opened."""
    scan = _scan_frames(source, format)
    return scan[0] if scan is not None and scan[1] else None


def open_pack(path: str | os.PathLike, index: str | int = ":", keys: Mapping[str, str] | None = None) -> GraphStore:
    """A pack's structures selected by ``index``, lazily (read as they are asked for).  Label keys other than the
    defaults must be those the pack was made with: its labels were read then, and another key would silently not
    apply (a file ``format`` among ``keys`` does not apply to a pack and is ignored)."""
    from equiforce.data.packed import READER_DEFAULTS, GraphStore

    store = GraphStore.open(path)
    _check_index(index, str(path))
    packed_with = store.index["reader"]
    differ = [f"{key} {value!r} (packed with {packed_with.get(key)!r})" for key, value in (keys or {}).items()
              if key != "format" and value != READER_DEFAULTS[key] and value != packed_with.get(key)]
    if differ:
        raise DataError(f"a pack's labels were read when it was packed: {'; '.join(differ)}; leave the keys at their "
                        "defaults for a pack, or pack again with them", source=str(path))
    return store.subset(_frame_numbers(index, 0, len(store), str(path)))


def _read_pack(path: str | os.PathLike, index: str | int, keys: dict[str, str], *,
               require_forces: bool) -> list[Configuration]:
    """A pack's structures in memory (every one has an energy: packing requires it); see :func:`open_pack`."""
    store = open_pack(path, index, keys)
    configs = [store.configuration(k) for k in range(len(store))]
    for config in configs:
        if require_forces and config.forces is None:
            raise DataError("no forces (it was packed without them)", field="forces", source=config.source,
                            frame=config.frame)
    return configs


def _read_db(source: str, index: str | int, keys: dict, required: dict) -> list[Configuration]:
    import ase.db

    _check_database_file(source)
    try:
        with ase.db.connect(source, type="db") as db:
            rows = list(db.select())
        chosen = _frame_numbers(index, 0, len(rows), source)
        rows = [rows[k] for k in chosen]
        frames = [_row_atoms(row) for row in rows]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read ASE database: {type(err).__name__}: {err}", source=source) from err
    return [_atoms_to_config(atoms, source, frame, **keys, **required) for atoms, frame in zip(frames, chosen)]


def _lookup(atoms: Atoms, key: str, per_atom: bool) -> Any:
    """A label from arrays/info, else from the calculator's stored results (never recomputed)."""
    if per_atom and key in atoms.arrays:
        return atoms.arrays[key]
    if key in atoms.info:
        return atoms.info[key]
    calc = atoms.calc
    results = getattr(calc, "results", None) if calc is not None else None
    if results and key in results:
        return results[key]
    return None


def _atoms_to_config(atoms: Atoms, source: str, frame: int, *, energy_key: str, forces_key: str,
                     stress_key: str, virial_key: str, config_type_key: str, weight_key: str,
                     require_energy: bool, require_forces: bool, hessian_key: str = "hessian") -> Configuration:
    where = {"source": source, "frame": frame}
    n = len(atoms)
    if n == 0:
        raise DataError("frame has no atoms", field="numbers", **where)
    _check_atomic_numbers(atoms.numbers, where)
    positions = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell, dtype=np.float64)
    _check_finite(positions, "positions", where)
    _check_finite(cell, "cell", where)

    energy = _as_energy(_lookup(atoms, energy_key, per_atom=False), energy_key, where)
    if energy is None and require_energy:
        raise DataError(f"energy label missing (the frame carries {_names_in(atoms)})", field=energy_key, **where)

    forces = _lookup(atoms, forces_key, per_atom=True)
    if forces is not None:
        forces = _as_array(forces, forces_key, where)
        if forces.shape != (n, 3):
            raise DataError(f"forces must have shape ({n}, 3), got {forces.shape}", field=forces_key, **where)
        _check_finite(forces, forces_key, where)
    elif require_forces:
        raise DataError(f"forces label missing (the frame carries {_names_in(atoms)})", field=forces_key, **where)

    stress = _lookup(atoms, stress_key, per_atom=False)
    if stress is not None:
        stress = _as_stress(stress, stress_key, where)
    else:
        virial = _lookup(atoms, virial_key, per_atom=False)
        if virial is not None:
            virial = _as_stress(virial, virial_key, where)
            volume = abs(float(np.linalg.det(cell)))
            if volume < 1e-8:
                raise DataError("virial given but the cell has zero volume", field=virial_key, **where)
            stress = -virial / volume

    hessian = _lookup(atoms, hessian_key, per_atom=True)
    if hessian is not None:
        hessian = _as_array(hessian, hessian_key, where)
        if hessian.size != 9 * n * n:
            raise DataError(f"a Hessian needs {9 * n * n} values ([{3 * n}, {3 * n}], or [{n}, {9 * n}] per atom), "
                            f"got shape {hessian.shape}", field=hessian_key, **where)
        _check_finite(hessian, hessian_key, where)
        hessian = hessian.reshape(3 * n, 3 * n)
        asymmetry = float(np.abs(hessian - hessian.T).max())
        if asymmetry > 1e-3 * max(1.0, float(np.abs(hessian).max())):
            raise DataError(f"the Hessian is not symmetric (largest |H - Hᵀ| {asymmetry:.3g} eV/Å²): rows and "
                            "columns must both run over atoms, then x, y, z", field=hessian_key, **where)
        hessian = 0.5 * (hessian + hessian.T)

    config_type = atoms.info.get(config_type_key, "Default")
    weight = atoms.info.get(weight_key, 1.0)
    try:
        weight = float(weight)
    except (TypeError, ValueError) as err:
        raise DataError(f"weight must be a number, got {weight!r}", field=weight_key, **where) from err
    if not np.isfinite(weight) or weight < 0:
        raise DataError(f"weight must be finite and non-negative, got {weight}", field=weight_key, **where)
    label_keys = {energy_key, forces_key, stress_key, virial_key, config_type_key, weight_key, hessian_key}
    info = {k: v for k, v in atoms.info.items() if k not in label_keys}
    return Configuration(numbers=atoms.numbers, positions=positions, cell=cell, pbc=atoms.pbc, energy=energy,
                         forces=forces, stress=stress, hessian=hessian, config_type=str(config_type),
                         weight=weight, source=source, frame=frame, info=info)


def _names_in(atoms: Atoms) -> list[str]:
    """The names a frame carries (per-atom arrays, info entries, stored calculator results): what a label key that
    found nothing could have been."""
    calc = atoms.calc
    results = (getattr(calc, "results", None) or {}) if calc is not None else {}
    return sorted((set(atoms.arrays) - {"numbers", "positions"}) | set(atoms.info) | set(results))


def _check_atomic_numbers(numbers: np.ndarray, where: dict) -> None:
    """Elements 1..118 only: ASE's ghost atom "X" (0) has no mass or reference energy, so no model can learn it."""
    bad = (numbers < 1) | (numbers > 118)
    if bad.any():
        atom = int(np.flatnonzero(bad)[0])
        raise DataError(f"atom {atom} has atomic number {int(numbers[atom])}; elements must be 1 to 118 (a ghost "
                        "atom 'X' is 0)", field="numbers", **where)


def _check_finite(values: np.ndarray, field: str, where: dict) -> None:
    if not np.all(np.isfinite(values)):
        raise DataError("contains NaN or infinity", field=field, **where)


def _as_array(value: Any, field: str, where: dict) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"not numeric: {value!r:.80}", field=field, **where) from err
    # ASE databases hand out read-only arrays, which torch.from_numpy warns about: own a writable copy
    return array if array.flags.writeable else array.copy()


def _as_energy(value: Any, field: str, where: dict) -> float | None:
    if value is None:
        return None
    arr = _as_array(value, field, where)
    if arr.size != 1:
        raise DataError(f"energy must be a single number, got shape {arr.shape}", field=field, **where)
    _check_finite(arr, field, where)
    return float(arr.reshape(-1)[0])


def _as_stress(value: Any, field: str, where: dict) -> np.ndarray:
    arr = _as_array(value, field, where)
    try:
        full = voigt_to_full(arr)
    except ValueError as err:
        raise DataError(str(err), field=field, **where) from err
    _check_finite(full, field, where)
    return full


# ---------------------------------------------------------------------------------------------
# rMD17 / MD17 npz


def _npz_get(data: Any, name: str, source: str, required: bool) -> tuple[str, np.ndarray | None]:
    for key in _NPZ_KEYS[name]:
        if key in data.files:
            try:
                return key, np.asarray(data[key])
            except Exception as err:
                raise DataError(f"cannot load array: {type(err).__name__}: {err}", source=source,
                                field=key) from err
    if required:
        raise DataError(f"npz has none of the keys {list(_NPZ_KEYS[name])} (found {sorted(data.files)})",
                        source=source, field=_NPZ_KEYS[name][0])
    return _NPZ_KEYS[name][0], None


def _check_npz_keys(keys: Mapping[str, str], source: str) -> None:
    """An npz is read by the (r)MD17 array names and units; a label key set for it would silently not apply."""
    from equiforce.data.packed import READER_DEFAULTS

    given = [f"{key} {value!r}" for key, value in keys.items() if value != READER_DEFAULTS[key]]
    if given:
        raise DataError(f"label keys do not apply to an npz file ({', '.join(given)}): it is read by the (r)MD17 array "
                        f"names {[names[0] for names in _NPZ_KEYS.values()]} in kcal/mol and kcal/mol/Å; convert "
                        "other npz layouts to extxyz", source=source)


def _npz_numeric(values: np.ndarray, key: str, source: str) -> np.ndarray:
    """``values`` as float64, or a :class:`DataError` naming the array (strings, objects, complex numbers)."""
    if values.dtype.kind not in "biuf":
        raise DataError(f"array is not real numbers (dtype {values.dtype})", source=source, field=key)
    return values.astype(np.float64)


def _read_npz(source: str, index: str | int, *, require_energy: bool, require_forces: bool) -> list[Configuration]:
    try:
        data = np.load(source, allow_pickle=False)
    except Exception as err:
        raise DataError(f"cannot read npz file: {type(err).__name__}: {err}", source=source) from err
    if not hasattr(data, "files"):
        raise DataError("expected an .npz archive, found a single array", source=source)
    with data:
        zkey, numbers = _npz_get(data, "numbers", source, True)
        rkey, coords = _npz_get(data, "positions", source, True)
        ekey, energies = _npz_get(data, "energy", source, require_energy)
        fkey, forces = _npz_get(data, "forces", source, require_forces)

    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[-1] != 3:
        raise DataError(f"coordinates must have shape (frames, atoms, 3), got {coords.shape}", source=source,
                        field=rkey)
    n_frames, n_atoms = coords.shape[:2]
    if n_atoms == 0:
        raise DataError("frames have no atoms", source=source, frame=0, field=rkey)
    if numbers.ndim == 2 and numbers.shape[0] == n_frames and n_frames > 1:
        per_frame = numbers
    else:
        per_frame = np.broadcast_to(numbers.reshape(-1), (n_frames, numbers.size))
    if per_frame.shape != (n_frames, n_atoms):
        raise DataError(f"{per_frame.shape[-1]} atomic numbers for {n_atoms} atoms", source=source, frame=0,
                        field=zkey)
    numbers = _npz_numeric(per_frame, zkey, source)
    if not np.all(numbers == np.round(numbers)) or numbers.min() < 1 or numbers.max() > 118:
        bad = numbers[(numbers != np.round(numbers)) | (numbers < 1) | (numbers > 118)].reshape(-1)[0]
        raise DataError(f"atomic numbers must be whole numbers from 1 to 118, found {bad:g}", source=source,
                        field=zkey)
    numbers = numbers.astype(np.int64)
    coords = _npz_numeric(coords, rkey, source)
    if energies is not None:
        if energies.size != n_frames:
            raise DataError(f"expected {n_frames} energies, got shape {energies.shape}", source=source, field=ekey)
        energies = _npz_numeric(energies, ekey, source).reshape(n_frames) * KCAL_PER_MOL
    if forces is not None:
        if forces.shape != coords.shape:
            raise DataError(f"forces shape {forces.shape} does not match coordinates {coords.shape}",
                            source=source, field=fkey)
        forces = _npz_numeric(forces, fkey, source) * KCAL_PER_MOL

    configs = []
    for frame in _frame_numbers(index, 0, n_frames, source):
        where = {"source": source, "frame": frame}
        _check_finite(coords[frame], rkey, where)
        energy = None
        if energies is not None:
            _check_finite(energies[frame], ekey, where)
            energy = float(energies[frame])
        f = None
        if forces is not None:
            f = forces[frame]
            _check_finite(f, fkey, where)
        configs.append(Configuration(numbers=numbers[frame], positions=coords[frame].astype(np.float64),
                                     energy=energy, forces=f, source=source, frame=frame))
    return configs

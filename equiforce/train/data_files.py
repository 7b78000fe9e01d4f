"""The files a config's ``data`` section names, read with its label keys and checked for what a mistyped key
would silently leave out.

A label key that matches nothing is not an error frame by frame (forces are optional per structure), so a
``forces_key: REF_force`` for data holding ``REF_forces`` used to train an energy-only model without a word.
Here it is an error naming the key, the file and the names the file does carry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from equiforce.data.io import label_names, read_configurations
from equiforce.data.packed import is_pack
from equiforce.data.structure import Configuration
from equiforce.errors import DataError
from equiforce.train.config import DataConfig, TrainingConfig


def reader_options(data: DataConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`read_configurations` that the ``data`` section sets."""
    return dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key,
                virial_key=data.virial_key, config_type_key=data.config_type_key, weight_key=data.weight_key,
                hessian_key=data.hessian_key, format=data.format)


def read_labelled(path: str | os.PathLike, data: DataConfig, training: TrainingConfig,
                  require_energy: bool = True) -> list[Configuration]:
    """Structures of ``path``, refused when a label the training asks for is under none of them (see module)."""
    configs = read_configurations(path, **reader_options(data), require_energy=require_energy)
    check_label_keys(configs, path, data, training)
    return configs


def check_label_keys(configs: Sequence[Configuration], path: str | os.PathLike, data: DataConfig,
                     training: TrainingConfig) -> None:
    def hint() -> str:
        names = label_names(path, data.format)
        return f"the first frame carries {names}" if names else "no names could be listed"

    if training.forces_weight > 0 and not any(c.forces is not None for c in configs):
        if is_pack(path):  # its labels were read when it was packed
            raise DataError("no structure has forces (packed without them); pack again with the forces key the files "
                            "use (--forces-key), or set training.forces_weight: 0", source=str(path), field="forces")
        raise DataError(f"no structure has forces under this key ({hint()}); set data.forces_key to the name the "
                        "file uses, or training.forces_weight: 0 to train on energies only", source=str(path),
                        field=data.forces_key)
    custom_stress = data.stress_key != "stress" or data.virial_key != "virial"
    if custom_stress and training.stress_weight > 0 and not any(c.stress is not None for c in configs):
        raise DataError(f"no structure has stress under data.stress_key '{data.stress_key}' or virial under "
                        f"data.virial_key '{data.virial_key}' ({hint()})", source=str(path), field=data.stress_key)

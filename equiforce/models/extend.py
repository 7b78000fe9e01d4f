"""Teaching a trained potential new elements: the same network with more rows in its element tables.

A model knows a fixed, sorted list of elements; every element-dependent weight has one slice per element
(the embedding's columns, the many-body product's per-element weights, the element-dependent skip and
message maps, the E0s and the per-element shift correction).  Adding elements builds the model of the larger
list and copies each trained slice into the slot of its element there; the new elements' slices keep their
fresh initialisation (their one-hot entry is zero on structures without them), so the extended model gives
exactly the old energies and forces on every structure made of the old elements, and fine-tuning then
teaches it the new ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from equiforce.models.potential import Potential, build_model
from equiforce.models.spec import ModelSpec


def with_elements(model: Potential, elements: Sequence[int], e0s: Mapping[int, float], *,
                  seed: int = 0) -> Potential:
    """A copy of ``model`` that also knows ``elements``, with reference energies ``e0s`` for the new ones.

    Elements the model already knows keep their weights and E0s; a new element's weights start as a fresh
    model's would (``seed``), its E0 from ``e0s`` (each new element needs one).  Short-range fades are kept
    as they are (pairs with a new element are not faded); a ZBL prior covers the new elements by itself.
    """
    old = list(model.spec.elements)
    added = sorted({int(z) for z in elements} - set(old))
    if not added:
        return model
    missing = [z for z in added if z not in e0s]
    if missing:
        raise ValueError(f"no E0 given for the new element(s) {missing}")
    merged = sorted(set(old) | set(added))
    spec = ModelSpec.model_validate({**model.spec.model_dump(), "elements": merged,
                                     "e0s": {**model.spec.e0s, **{z: float(e0s[z]) for z in added}}})
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        grown = build_model(spec, dtype=dtype)
    slots = torch.tensor([merged.index(z) for z in old])
    state = grown.state_dict()
    for name, value in model.state_dict().items():
        state[name] = _spread(value.detach().cpu(), state[name], slots, len(old), len(merged), name)
    grown.load_state_dict(state, strict=True)
    return grown.to(next(model.parameters()).device).train(model.training)


def _spread(old: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, n_old: int, n_new: int,
            name: str) -> torch.Tensor:
    """``new`` with the values of ``old`` written into the old elements' slots of every element axis.

    An axis is an element axis where its length changed with the element count: either the element count
    itself, or ``k`` blocks of it flattened with the element fastest (the ``x ⊗ onehot`` input of
    :class:`~equiforce.nn.linear.ElementIrrepsLinear`).  Tensors without one are copied whole.
    """
    if old.shape == new.shape:
        return old.clone()
    if old.dim() != new.dim():
        raise ValueError(f"{name}: shape {tuple(old.shape)} cannot grow into {tuple(new.shape)}")
    out = new.detach().cpu().clone()
    index: list[torch.Tensor | slice] = []
    for axis, (a, b) in enumerate(zip(old.shape, new.shape)):
        if a == b:
            index.append(slice(None))
        elif a == n_old and b == n_new:
            index.append(slots)
        elif a % n_old == 0 and b % n_new == 0 and a // n_old == b // n_new:
            blocks = torch.arange(a // n_old).unsqueeze(1) * n_new
            index.append((blocks + slots.unsqueeze(0)).reshape(-1))
        else:
            raise ValueError(f"{name}: axis {axis} of length {a} is no element axis ({n_old} -> {n_new} elements)")
    # write one element axis at a time (advanced indices on several axes would pair up instead of crossing)
    _assign(out, index, old)
    return out


def _assign(out: torch.Tensor, index: list[torch.Tensor | slice], values: torch.Tensor) -> None:
    """``out[index] = values`` with each tensor index selecting along its own axis (an outer product)."""
    grids = []
    for axis, item in enumerate(index):
        positions = item if isinstance(item, torch.Tensor) else torch.arange(out.shape[axis])
        shape = [1] * out.dim()
        shape[axis] = -1
        grids.append(positions.reshape(shape))
    out[tuple(grids)] = values

"""What every model with uncertainty shares: the Potential interface, calibration, unseen elements.

A UQ model *is* a potential to its callers (evaluation, the ASE calculator, batched MD, active learning):
same ``forward(graph, compute_forces, compute_stress, ...)`` contract, same ``cutoff``/``spec``/
``check_elements``, plus the σ outputs of :mod:`equiforce.uq.keys`.  Nothing downstream needs to know
whether σ comes from an ensemble or from heads on one model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from equiforce.errors import UnknownElementError
from equiforce.models.spec import ModelSpec
from equiforce.uq import keys as UK
from equiforce.uq.calibration import Calibration


class UQModel(nn.Module):
    """Base of :class:`~equiforce.uq.ensemble.EnsemblePotential` and :class:`~equiforce.uq.heads.UQPotential`.

    ``seen_elements`` are the elements present in the data the uncertainty was trained and calibrated
    on.  An element in the model's spec but not seen there has no meaningful σ: :meth:`check_elements`
    (called by evaluation, the calculator and MD before any step) refuses it by name, and a direct
    ``forward`` on such a graph returns σ = inf for its atoms (and their structures), never a silent
    small σ.
    """

    spec: ModelSpec

    def __init__(self, spec: ModelSpec, calibration: Calibration | None = None,
                 seen_elements: Iterable[int] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.cutoff = spec.cutoff
        self.calibration = calibration or Calibration()
        self.header: dict = {}
        self.set_seen_elements(spec.elements if seen_elements is None else seen_elements)

    def set_seen_elements(self, elements: Iterable[int]) -> None:
        seen = sorted({int(z) for z in elements})
        unknown = sorted(set(seen) - set(self.spec.elements))
        if unknown:
            raise ValueError(f"seen elements {unknown} are not in the model's elements {self.spec.elements}")
        self.seen_elements = seen
        mask = torch.zeros(119, dtype=torch.bool)
        mask[torch.tensor(seen, dtype=torch.long)] = True
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        self.register_buffer("_seen_mask", mask.to(device), persistent=False)

    @property
    def elements(self) -> list[int]:
        return list(self.spec.elements)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_elements(self, numbers) -> None:
        """Raise :class:`UnknownElementError` for elements the model, or its uncertainty, never saw."""
        from ase.data import chemical_symbols

        found = {int(z) for z in numbers}
        unknown = sorted(found - set(self.spec.elements))
        if unknown:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.spec.elements)
            raise UnknownElementError(f"element(s) {names} not known to this model (trained on {known})")
        unseen = sorted(found - set(self.seen_elements))
        if unseen:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unseen)
            seen = ", ".join(chemical_symbols[z] for z in self.seen_elements)
            raise UnknownElementError(f"element(s) {names} never appeared in this model's training/calibration "
                                      f"data (seen: {seen}): its uncertainty would be meaningless")

    def _finish(self, out: dict[str, torch.Tensor], graph: dict[str, torch.Tensor],
                raw: dict[str, torch.Tensor], calibrated: bool) -> dict[str, torch.Tensor]:
        """Calibrate raw σ, set σ = inf on atoms of unseen elements and their structures."""
        from equiforce.data import keys as K
        from equiforce.data.graph import sum_per_graph

        unseen_atom = ~self._seen_mask[graph[K.NUMBERS]]
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
        num_graphs = graph[K.CELL].shape[0]
        unseen_graph = sum_per_graph(unseen_atom.to(torch.float32), batch, num_graphs) > 0
        for quantity, sigma in raw.items():
            if calibrated:
                sigma = self.calibration.apply(quantity, sigma)
            mask = unseen_atom if quantity == "forces" else unseen_graph
            while mask.dim() < sigma.dim():
                mask = mask.unsqueeze(-1)
            sigma = sigma.detach()  # σ is a report, never a training target through the model
            out[UK.SIGMA_KEYS[quantity]] = torch.where(mask, torch.full_like(sigma, float("inf")), sigma)
        return out

    def descriptors(self, graph: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer invariant node features (for selection in active learning)."""
        raise NotImplementedError

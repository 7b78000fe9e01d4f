"""The training loss: weighted, masked mean-squared (or Huber) errors of energy per atom, forces, stress and
Hessian-vector products (see :mod:`equiforce.train.hessian_loss`).

Energy is compared per atom so that large and small cells pull equally; every term is masked by the
``has_*`` flags (a frame without forces contributes nothing to the force term) and weighted by the
per-configuration ``weight``.  Each term is a mean over the labelled entries only, so a batch with few
stress labels does not dilute their gradient.
"""

from __future__ import annotations

import torch

from equiforce.data import keys as K

Tensor = torch.Tensor


def _masked_sum(sq: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """``[Σ w·m·sq, Σ m]`` over all entries (the mean is their ratio; zero when nothing is labelled)."""
    while weight.dim() < sq.dim():
        weight, mask = weight.unsqueeze(-1), mask.unsqueeze(-1)
    return torch.stack([(weight * mask * sq).sum(), (mask * torch.ones_like(sq)).sum()])


TERMS = ("energy", "forces", "stress", "hessian")


class WeightedLoss:
    """``energy_weight·L_E + forces_weight·L_F + stress_weight·L_S``; weights are plain attributes so a
    later schedule (e.g. a second training stage) can change them between epochs."""

    def __init__(self, energy_weight: float = 1.0, forces_weight: float = 100.0, stress_weight: float = 1.0,
                 kind: str = "mse", huber_delta: float = 0.01, hessian_weight: float = 0.0) -> None:
        if kind not in ("mse", "huber"):
            raise ValueError(f"unknown loss {kind!r} (mse or huber)")
        self.energy_weight = float(energy_weight)
        self.forces_weight = float(forces_weight)
        self.stress_weight = float(stress_weight)
        self.hessian_weight = float(hessian_weight)
        self.kind, self.huber_delta = kind, float(huber_delta)

    def _penalty(self, error: Tensor) -> Tensor:
        """Squared error, or Huber: quadratic within ``delta``, linear beyond (×2 so both agree near 0)."""
        if self.kind == "mse":
            return error.square()
        return 2.0 * torch.nn.functional.huber_loss(error, torch.zeros_like(error), reduction="none",
                                                    delta=self.huber_delta)

    def term_sums(self, pred: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per term ``[Σ w·m·penalty, Σ m]`` (with grad), only for the terms the prediction carries."""
        weight = batch[K.WEIGHT]
        out: dict[str, Tensor] = {}
        n_atoms = batch[K.N_ATOMS].to(pred[K.ENERGY].dtype)
        err = (pred[K.ENERGY] - batch[K.ENERGY]) / n_atoms
        out["energy"] = _masked_sum(self._penalty(err), weight, batch[K.HAS_ENERGY])
        if K.FORCES in pred:
            atom_graph = batch[K.BATCH]
            sq = self._penalty(pred[K.FORCES] - batch[K.FORCES])
            out["forces"] = _masked_sum(sq, weight[atom_graph], batch[K.HAS_FORCES][atom_graph])
        if K.STRESS in pred:
            sq = self._penalty(pred[K.STRESS] - batch[K.STRESS])
            out["stress"] = _masked_sum(sq, weight, batch[K.HAS_STRESS])
        if K.HESSIAN_VP in pred:  # [k, N, 3] products of the model and of the labels, for the same vectors
            sq = self._penalty(pred[K.HESSIAN_VP] - pred[K.HESSIAN_VP_REF]).transpose(0, 1)  # [N, k, 3]
            out["hessian"] = _masked_sum(sq, weight[batch[K.BATCH]], pred[K.HESSIAN_VP_MASK])
        return out

    def components(self, pred: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted per-term losses (with grad): each a mean over its labelled entries in the batch."""
        return {name: value[0] / value[1].clamp(min=1.0) for name, value in self.term_sums(pred, batch).items()}

    def weights(self) -> dict[str, float]:
        return {"energy": self.energy_weight, "forces": self.forces_weight, "stress": self.stress_weight,
                "hessian": self.hessian_weight}

    def __call__(self, pred: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (differentiable) and its unweighted components, detached (no device sync here)."""
        parts = self.components(pred, batch)
        weights = self.weights()
        total = sum((weights[name] * value for name, value in parts.items()), torch.zeros_like(parts["energy"]))
        return total, {name: value.detach() for name, value in parts.items()}


class LossSums:
    """The loss of a whole set, accumulated batch by batch (``update(pred, batch)``, as metrics are).

    Each term is summed over its labelled entries and divided once at the end, so the value is the same however
    the set is cut into batches or shared out between training processes (:meth:`reduce` with an all-reduce);
    a mean of per-batch means is not, once structures differ in size.
    """

    def __init__(self, loss: WeightedLoss) -> None:
        self.loss = loss
        self._sums: Tensor | None = None  # [terms, 2]

    def update(self, pred: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        sums = self.loss.term_sums(pred, batch)
        reference = sums["energy"].detach()
        rows = torch.stack([sums[name].detach() if name in sums else torch.zeros_like(reference) for name in TERMS])
        self._sums = rows if self._sums is None else self._sums + rows

    def reduce(self, reduce) -> None:
        """Replace the sums by ``reduce(sums)`` (an all-reduce over processes; every process must call it)."""
        if self._sums is None:
            raise RuntimeError("no batch was added")
        self._sums = reduce(self._sums)

    def value(self) -> float:
        if self._sums is None:
            return float("nan")
        sums = self._sums.double().cpu()
        weights = self.loss.weights()
        return float(sum(weights[name] * sums[k, 0] / max(float(sums[k, 1]), 1.0) for k, name in enumerate(TERMS)))

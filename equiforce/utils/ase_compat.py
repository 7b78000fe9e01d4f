"""One name for ASE functions that moved between the ASE versions pyproject allows (>= 3.23)."""

from __future__ import annotations

try:  # ASE >= 3.29, where MaxwellBoltzmannDistribution is deprecated
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

__all__ = ["thermalize_momenta"]

"""equiforce: equivariant machine-learning interatomic potentials — train, trust, simulate."""

__version__ = "0.1.0"

from equiforce.models import ModelSpec, Potential, build_model  # noqa: E402
from equiforce.models.file import load_model, save_model  # noqa: E402
from equiforce.sim.calculator import Calculator  # noqa: E402
from equiforce.sim.hessian import hessian, vibrational_frequencies  # noqa: E402

__all__ = ["Calculator", "ModelSpec", "Potential", "__version__", "build_model", "hessian", "load_model",
           "save_model", "vibrational_frequencies"]

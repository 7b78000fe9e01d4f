"""Shared fixtures: small random models in float64 and test structures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from equiforce.models import ModelSpec, build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

MODEL_CONFIGS = {
    "L1-corr3": dict(elements=[1, 6, 8, 28, 29], channels=8, max_l=1, sh_lmax=3, correlation=3, num_layers=2,
                     radial_mlp=[16, 16], cutoff=4.0, e0s={1: -13.6, 29: -1.5}, energy_scale=0.7,
                     energy_shift=0.1, avg_num_neighbors=8.0),
    "L2-corr2-zbl": dict(elements=[1, 6, 8, 28, 29], channels=6, max_l=2, sh_lmax=2, correlation=2,
                         num_layers=3, radial_mlp=[12], cutoff=3.5, zbl=True, envelope_p=5,
                         avg_num_neighbors=6.0, basis_bound=0.5,  # small bound: the squashing is nonlinear here
                         # ranges that the rattled test structures' C-H and metal pairs straddle
                         short_range_fade={"H-C": (0.9, 1.2), "Ni-Cu": (2.2, 2.6), "Cu-Cu": (2.2, 2.7)},
                         zbl_range="fade"),  # the prior only where the network fades (unlisted pairs: covalent)
    # the options that widen the product and the messages (rank-2 product, element-dependent first-layer
    # messages, paths kept apart until the channel mixing), and the bond-length shift gate with a shift that
    # matters (Cu/Ni pairs reach past the cutoff's end of the switch: its clamped form is exercised too)
    "L1-corr3-branches": dict(elements=[1, 6, 8, 28, 29], channels=6, max_l=1, sh_lmax=2, correlation=3,
                              num_layers=2, radial_mlp=[12], cutoff=4.0, product_branches=2, element_messages=True,
                              separate_paths=True, avg_num_neighbors=8.0, shift_gate="bonds", energy_shift=-0.8),
}

# not a fixture parameter: the smallest model with every kind of layer, for tests whose cost is a trace or a cold
# compilation (an aot_eager trace of its forces takes ~17 s on 2 cores against ~36 s for L1-corr3)
SMALL_CONFIG = dict(elements=[1, 6, 8, 28, 29], channels=8, max_l=1, sh_lmax=2, correlation=2, num_layers=2,
                    radial_mlp=[16], cutoff=4.0, avg_num_neighbors=8.0)


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(**(SMALL_CONFIG if name == "small" else MODEL_CONFIGS[name])), dtype=dtype)
    # random init leaves some weights at 1; perturb so that every path contributes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=sorted(MODEL_CONFIGS))
def model(request):
    return make_model(request.param)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA

"""The architecture and normalisation of a potential: everything needed to rebuild it from a file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_BOND_SWITCH = (1.3, 1.8)  # shift_gate "bonds": bonded below 1.3x, unbonded beyond 1.8x the covalent radii
WIDE_BOND_SWITCH = (1.0, 2.3)  # the bond switch of new models: the shift fades gently as a bond breaks
AUTO_FADE_FRACTIONS = (0.75, 0.95)
"""``short_range_fade: auto``: each pair fades between these fractions of its shortest distance in the data — the
network sees nothing new below 95 % of it (the ethanol test set's closest pairs lie within 1.3 % of the training
set's), and the fade spans a fifth of a bond length, so the forces it adds stay moderate."""


class ModelSpec(BaseModel):
    """Hyper-parameters of the MACE-class potential.  Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    elements: list[int] = Field(description="atomic numbers the model knows, sorted")
    cutoff: float = Field(5.0, gt=0, description="radial cutoff in Å")
    channels: int = Field(64, ge=1, description="feature channels per degree")
    max_l: int = Field(1, ge=0, le=3, description="highest degree of the hidden features")
    sh_lmax: int = Field(3, ge=1, le=4, description="highest degree of the edge spherical harmonics")
    correlation: int = Field(3, ge=1, le=4, description="body order of the product is correlation + 1")
    num_layers: int = Field(2, ge=1, le=6)
    num_radial: int = Field(8, ge=1, description="Bessel radial basis functions")
    radial_mlp: list[int] = Field(default_factory=lambda: [64, 64, 64])
    envelope_p: int = Field(6, ge=2, description="exponent of the polynomial cutoff envelope")
    readout_hidden: int = Field(16, ge=1, description="width of the last layer's readout MLP")
    avg_num_neighbors: float = Field(1.0, gt=0, description="normalises the neighbour sum")
    e0s: dict[int, float] = Field(default_factory=dict, description="per-element reference energies, eV")
    energy_scale: float = Field(1.0, gt=0, description="scale of the network's atomic energies, eV")
    energy_shift: float = Field(0.0, description="per-atom shift added after the E0s, eV")
    zbl: bool = Field(False, description="add a ZBL short-range repulsion prior")
    zbl_range: Literal["covalent", "fade", "handover"] = Field(
        "covalent", description="where the ZBL prior acts: 'covalent': switched off smoothly at the sum of the two "
                                "covalent radii, which lies inside the bond-length range of typical data (C-H, "
                                "O-H), so the network must learn to cancel it there; 'fade': only where "
                                "short_range_fade hands a pair from the network to the prior — ZBL times one minus "
                                "the fade, off beyond r_out, and times its covalent switch as well (so for a pair "
                                "whose r_in lies beyond its covalent-radius sum, such as H-H, neither acts in "
                                "between: docs/design.md); 'handover': ZBL times one minus the fade alone, "
                                "without the covalent switch, so the prior takes over exactly what the network "
                                "lets go of; pairs without a fade range keep the covalent range")
    product_branches: int = Field(1, ge=1, le=8, description="independent iterations summed in the many-body "
                                                              "product (rank of its weight factorisation)")
    element_messages: bool = Field(False, description="first layer: mix the channels of the atomic basis with "
                                                      "weights that depend on the centre's element (as MACE's "
                                                      "first interaction block does)")
    separate_paths: bool = Field(False, description="keep the convolution's coupling paths apart until the "
                                                    "message's channel mixing (as MACE does), which then mixes "
                                                    "channels and paths together; off: the paths' terms are "
                                                    "summed per channel first")
    shift_gate: Literal["coordination", "bonds"] = Field(
        "coordination", description="how the per-atom shift is switched on: 'coordination': 1 - exp(-n) with n the "
                                    "sum of the cutoff envelope over all neighbours (reaches out to the cutoff); "
                                    "'bonds': 1 - prod_j (1 - s_ij), s_ij = 1 for a pair closer than 1.3x the sum "
                                    "of their covalent radii, 0 beyond 1.8x (bond_switch; smooth in between): "
                                    "exactly 1 for a bonded atom, 0 for one with no bond, so a stretched dimer or "
                                    "a removed H loses the shift over bond lengths, not over the whole cutoff")
    bond_switch: tuple[float, float] = Field(
        DEFAULT_BOND_SWITCH,
        description="shift_gate 'bonds': where the bond switch starts and ends, in units of the sum of the two "
                    "covalent radii (on below the first, off beyond the second); a wider range makes the shift "
                    "fade more gently as a bond breaks")
    basis_bound: float | None = Field(None, gt=0, description="bound each channel of the atomic basis before the "
                                                             "many-body product: A -> A / sqrt(1 + |A|^2 / b^2) "
                                                             "(|A| over all its irreps; equivariant, smooth, ~A "
                                                             "for |A| << b), so the polynomial product cannot grow "
                                                             "without limit where the data say nothing (very short "
                                                             "distances); null: off")
    short_range_fade: dict[str, tuple[float, float]] | None = Field(
        None, description="per element pair ('C-H': [r_in, r_out], Å): the network does not see a pair closer than "
                          "r_in and sees it fully beyond r_out (smooth in between), so at distances the training "
                          "data never reached only the ZBL prior (and the per-atom shift) act, as in DeePMD's "
                          "short-range table (use it with zbl: true, or nothing repels two atoms there); pairs "
                          "not listed are never faded; null: off")

    @field_validator("elements")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("elements must not be empty")
        if any(z < 1 or z > 118 for z in value):
            raise ValueError(f"atomic numbers must be in 1..118, got {value}")
        return sorted(set(value))

    @field_validator("bond_switch")
    @classmethod
    def _switch_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        on, off = value
        if not 0 < on < off:
            raise ValueError(f"bond_switch must be (on, off) with 0 < on < off, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _e0s_known(self) -> ModelSpec:
        unknown = set(self.e0s) - set(self.elements)
        if unknown:
            raise ValueError(f"e0s given for elements not in `elements`: {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _fade_pairs(self) -> ModelSpec:
        """Pair keys name two known elements ('C-H', either order, once); 0 <= r_in < r_out <= cutoff."""
        if self.short_range_fade is None:
            return self
        seen: set[tuple[int, int]] = set()
        for key, (r_in, r_out) in self.short_range_fade.items():
            pair = pair_numbers(key)
            if any(z not in self.elements for z in pair):
                raise ValueError(f"short_range_fade: {key!r} names an element not in `elements`")
            if pair in seen:
                raise ValueError(f"short_range_fade: the pair {key!r} is given twice")
            seen.add(pair)
            if not 0 <= r_in < r_out <= self.cutoff:
                raise ValueError(f"short_range_fade: {key!r} needs 0 <= r_in < r_out <= cutoff "
                                 f"({self.cutoff}), got [{r_in}, {r_out}]")
        return self

    @property
    def message_lmax(self) -> int:
        return max(self.sh_lmax, self.max_l)


def pair_numbers(key: str) -> tuple[int, int]:
    """'C-H' (or 'H-C') → (1, 6): the two atomic numbers of a pair key, sorted."""
    from ase.data import atomic_numbers

    parts = key.split("-")
    if len(parts) != 2 or any(p not in atomic_numbers or p == "X" for p in parts):
        raise ValueError(f"short_range_fade: {key!r} is not a pair of element symbols like 'C-H'")
    a, b = (atomic_numbers[p] for p in parts)
    return (a, b) if a <= b else (b, a)


def pair_key(z1: int, z2: int) -> str:
    """(6, 1) → 'H-C': the canonical key of a pair (lighter element first)."""
    from ase.data import chemical_symbols

    a, b = sorted((int(z1), int(z2)))
    return f"{chemical_symbols[a]}-{chemical_symbols[b]}"


def fade_from_closest(closest: dict[tuple[int, int], float],
                      fractions: tuple[float, float] = AUTO_FADE_FRACTIONS) -> dict[str, tuple[float, float]]:
    """``short_range_fade`` from the data's shortest distance ``d`` per pair (inside the cutoff, so the ranges
    are too; :func:`equiforce.data.stats.closest_pairs`): ``[lo * d, hi * d]`` for each pair."""
    lo, hi = fractions
    return {pair_key(*pair): (lo * d, hi * d) for pair, d in sorted(closest.items())}

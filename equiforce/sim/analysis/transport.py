"""Mean-squared displacement → diffusion coefficient with an error bar, and Arrhenius fits over temperature.

Units: Å, ps; D in Å²/ps (``× 1e-4`` for cm²/s).  Positions must be unwrapped (the native engine keeps them
so; for wrapped ASE frames use ``ase.geometry`` to unwrap first).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import units

from equiforce.sim.analysis.plots import new_figure, save_png


def _msd_fft(x: np.ndarray) -> np.ndarray:
    """MSD over all time origins for trajectories ``x [T, M]`` (M independent coordinates), summed over M.

    The O(T log T) algorithm: MSD(m) = S1(m) − 2 S2(m), S2 the autocorrelation by FFT (Kneller et al. 1995).
    """
    n = x.shape[0]
    spectrum = np.fft.rfft(x, n=2 * n, axis=0)
    s2 = np.fft.irfft(spectrum * spectrum.conj(), axis=0)[:n].sum(1) / (n - np.arange(n))
    d = (x * x).sum(1)
    d = np.append(d, 0.0)
    q = 2 * d.sum()
    s1 = np.zeros(n)
    for m in range(n):
        q -= d[m - 1] + d[n - m]
        s1[m] = q / (n - m)
    return s1 - 2 * s2


def mean_squared_displacement(positions: np.ndarray, timestep_ps: float, max_lag: int | None = None,
                              atoms: np.ndarray | None = None, remove_drift: bool = True,
                              axes: Sequence[int] = (0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """⟨|r(t0 + t) − r(t0)|²⟩ over time origins and the selected atoms, over the Cartesian ``axes`` only.

    ``positions [T, N, 3]`` unwrapped, one frame every ``timestep_ps``; ``atoms`` a boolean or index
    selection (default all); ``remove_drift`` subtracts the mean displacement of all atoms per frame;
    ``axes`` e.g. ``(0, 1)`` for the in-plane MSD of a slab or interface.
    Returns ``(lag_ps [L], msd_A2 [L])``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [frames, atoms, 3], got {positions.shape}")
    axes = _checked_axes(axes)
    if remove_drift:
        positions = positions - (positions.mean(1, keepdims=True) - positions[:1].mean(1, keepdims=True))
    selected = (positions if atoms is None else positions[:, atoms])[..., axes]
    n_frames, n_atoms = selected.shape[:2]
    msd = _msd_fft(selected.reshape(n_frames, -1)) / n_atoms
    max_lag = n_frames if max_lag is None else min(max_lag, n_frames)
    return np.arange(max_lag) * timestep_ps, msd[:max_lag]


def _checked_axes(axes: Sequence[int]) -> list[int]:
    axes = [int(a) for a in axes]
    if not axes or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
        raise ValueError(f"axes must be distinct Cartesian axes out of 0, 1, 2, got {axes}")
    return axes


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    design = np.stack([t, np.ones_like(t)], 1)
    return float(np.linalg.lstsq(design, y, rcond=None)[0][0])


@dataclass
class Diffusion:
    """``D`` (Å²/ps) from the whole run; ``D_err`` the standard error over ``n_blocks`` independent blocks."""

    D: float
    D_err: float
    fit_window_ps: tuple[float, float]
    lag_ps: np.ndarray
    msd: np.ndarray
    block_D: np.ndarray
    dimension: int = 3
    msd_exponent: float = float("nan")  # α of MSD ∝ t^α over the fit window: 1 where the atoms diffuse

    @property
    def D_cm2_per_s(self) -> float:
        return self.D * 1e-4

    @property
    def diffusive(self) -> bool:
        """Whether the MSD grows linearly over the fit window (α within 1 ± 0.2): otherwise ``D`` is the slope of
        ballistic flight (α → 2) or of vibration about fixed sites (α → 0), not a diffusion coefficient."""
        return bool(DIFFUSIVE[0] <= self.msd_exponent <= DIFFUSIVE[1])

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        figure, ax = new_figure()
        ax.plot(self.lag_ps, self.msd, color="C0", label="MSD")
        t0, t1 = self.fit_window_ps
        t = np.linspace(t0, t1, 50)
        inside = (self.lag_ps >= t0) & (self.lag_ps <= t1)
        offset = float(np.mean(self.msd[inside] - 2 * self.dimension * self.D * self.lag_ps[inside]))
        caveat = "" if self.diffusive else f" (MSD ∝ t^{self.msd_exponent:.2f}: not diffusive)"
        ax.plot(t, 2 * self.dimension * self.D * t + offset, color="C3", ls="--",
                label=f"D = {self.D:.3g} ± {self.D_err:.2g} Å²/ps{caveat}")
        ax.axvspan(t0, t1, color="0.9", zorder=0)
        ax.set_xlabel("lag time (ps)")
        ax.set_ylabel("MSD (Å²)")
        ax.set_title(title or "mean-squared displacement")
        ax.legend()
        save_png(figure, path)


def diffusion_coefficient(positions: np.ndarray, timestep_ps: float,
                          fit_window_ps: tuple[float, float] | None = None, n_blocks: int = 5,
                          atoms: np.ndarray | None = None, dimension: int | None = None,
                          remove_drift: bool = True, axes: Sequence[int] | None = None) -> Diffusion:
    """Einstein relation ``MSD = 2 d D t`` fitted over ``fit_window_ps`` (default: 10–50 % of a block).

    ``axes`` picks the directions (default all three; ``(0, 1)`` for in-plane diffusion in a slab), and ``d`` is
    their number; ``dimension`` alone may say 3 (a lower one needs its ``axes``, since which directions to drop
    cannot be guessed).  The error bar is from block averaging: the run is cut into ``n_blocks`` equal parts,
    D is fitted in each with the same window, and ``D_err = std/sqrt(n_blocks)``.
    """
    if axes is None:
        if dimension not in (None, 3):
            raise ValueError(f"dimension {dimension} needs the axes to keep, e.g. axes=(0, 1) for x and y")
        axes = (0, 1, 2)
    axes = _checked_axes(axes)
    if dimension is not None and dimension != len(axes):
        raise ValueError(f"dimension {dimension} does not match axes {axes}")
    dimension = len(axes)
    positions = np.asarray(positions, dtype=np.float64)
    n_frames = positions.shape[0]
    block = n_frames // max(1, n_blocks)
    if block < 4:
        raise ValueError(f"{n_frames} frames are too few for {n_blocks} blocks")
    if fit_window_ps is None:
        fit_window_ps = (0.1 * block * timestep_ps, 0.5 * block * timestep_ps)
    t0, t1 = fit_window_ps
    if not 0 <= t0 < t1 <= (block - 1) * timestep_ps:
        raise ValueError(f"fit window {fit_window_ps} ps must lie within one block ({(block - 1) * timestep_ps} ps)")

    def fit(lag: np.ndarray, msd: np.ndarray) -> float:
        inside = (lag >= t0) & (lag <= t1)
        return _slope(lag[inside], msd[inside]) / (2 * dimension)

    lag, msd = mean_squared_displacement(positions, timestep_ps, atoms=atoms, remove_drift=remove_drift, axes=axes)
    blocks = np.array([fit(*mean_squared_displacement(positions[k * block:(k + 1) * block], timestep_ps,
                                                      atoms=atoms, remove_drift=remove_drift, axes=axes))
                       for k in range(n_blocks)])
    error = float(blocks.std(ddof=1) / np.sqrt(n_blocks)) if n_blocks > 1 else float("nan")
    result = Diffusion(D=fit(lag, msd), D_err=error, fit_window_ps=(t0, t1), lag_ps=lag, msd=msd, block_D=blocks,
                       dimension=dimension, msd_exponent=_msd_exponent(lag, msd, t0, t1))
    if not result.diffusive:
        warnings.warn(f"the MSD grows as t^{result.msd_exponent:.2f} over the fit window {t0:g}–{t1:g} ps, not as t: "
                      "the atoms are not diffusing there (vibration about fixed sites gives an exponent near 0, "
                      "ballistic flight near 2), so D is not a diffusion coefficient; run longer or fit a later "
                      "window (fit_window_ps)", stacklevel=2)
    return result


DIFFUSIVE = (0.8, 1.2)  # MSD ∝ t^α: the exponents taken as linear growth


def _msd_exponent(lag: np.ndarray, msd: np.ndarray, t0: float, t1: float) -> float:
    """α of ``MSD ∝ t^α``: the slope of log MSD against log t over the window (positive lags and MSDs only)."""
    inside = (lag >= t0) & (lag <= t1) & (lag > 0) & (msd > 0)
    if inside.sum() < 2:
        return float("nan")
    return _slope(np.log(lag[inside]), np.log(msd[inside]))


@dataclass
class ArrheniusFit:
    """``D(T) = D0 exp(−Ea / kT)``: ``Ea`` in eV, ``D0`` in the units of the input D, with standard errors."""

    Ea: float
    Ea_err: float
    D0: float
    D0_err: float
    temperatures_K: np.ndarray = field(repr=False)
    D: np.ndarray = field(repr=False)
    D_err: np.ndarray | None = field(default=None, repr=False)

    def predict(self, temperature_K: float | np.ndarray) -> np.ndarray:
        return self.D0 * np.exp(-self.Ea / (units.kB * np.asarray(temperature_K)))

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        figure, ax = new_figure()
        inv = 1000.0 / self.temperatures_K
        ax.errorbar(inv, self.D, yerr=self.D_err, fmt="o", color="C0", label="simulation")
        grid = np.linspace(inv.min(), inv.max(), 50)
        ax.plot(grid, self.predict(1000.0 / grid), "--", color="C3",
                label=f"Ea = {self.Ea:.3f} ± {self.Ea_err:.3f} eV")
        ax.set_yscale("log")
        ax.set_xlabel("1000 / T (1/K)")
        ax.set_ylabel("D")
        ax.set_title(title or "Arrhenius fit")
        ax.legend()
        save_png(figure, path)


def arrhenius_fit(temperatures_K: Sequence[float], D: Sequence[float],
                  D_err: Sequence[float] | None = None) -> ArrheniusFit:
    """Weighted least squares of ``ln D`` against ``1/kT`` (weights ``D/D_err`` when errors are given)."""
    t, d = np.asarray(temperatures_K, dtype=np.float64), np.asarray(D, dtype=np.float64)
    if len(t) < 2 or np.any(d <= 0):
        raise ValueError("need at least two temperatures with positive D")
    sigma = np.ones_like(d) if D_err is None else np.asarray(D_err, dtype=np.float64) / d
    x = -1.0 / (units.kB * t)
    design = np.stack([x, np.ones_like(x)], 1) / sigma[:, None]
    target = np.log(d) / sigma
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ coef
    reduced_chi2 = float(residual @ residual / (len(t) - 2)) if len(t) > 2 else float("nan")
    if D_err is None:
        scale = reduced_chi2  # errors from the scatter about the line (nan for two points)
    else:
        scale = max(1.0, reduced_chi2) if len(t) > 2 else 1.0  # never smaller than the given errors say
    covariance = np.linalg.inv(design.T @ design) * scale
    ea, ln_d0 = coef
    errors = np.sqrt(np.diag(covariance))
    d0 = float(np.exp(ln_d0))
    return ArrheniusFit(Ea=float(ea), Ea_err=float(errors[0]), D0=d0, D0_err=d0 * float(errors[1]),
                        temperatures_K=t, D=d, D_err=None if D_err is None else np.asarray(D_err, dtype=np.float64))

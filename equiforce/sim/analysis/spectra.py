"""Vibrational density of states from the velocity autocorrelation (Wiener–Khinchin: |FFT(v)|²)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from ase import units

from equiforce.sim.analysis.plots import new_figure, save_png

CM_PER_FS = 1e15 / (units._c * 100)  # a frequency of 1 fs⁻¹ in cm⁻¹


@dataclass
class VDOS:
    """Spectrum on ``frequency_cm`` (cm⁻¹), normalised to ``∫ dos dν = 1``; ``vacf`` normalised to 1 at 0."""

    frequency_cm: np.ndarray
    dos: np.ndarray
    vacf: np.ndarray
    timestep_fs: float

    @property
    def frequency_thz(self) -> np.ndarray:
        return self.frequency_cm / CM_PER_FS * 1e3

    def peak_cm(self, lo: float = 1.0, hi: float | None = None) -> float:
        """Frequency of the highest peak in ``[lo, hi]`` cm⁻¹."""
        keep = (self.frequency_cm >= lo) & (self.frequency_cm <= (hi or np.inf))
        return float(self.frequency_cm[keep][np.argmax(self.dos[keep])])

    def plot(self, path: str | os.PathLike, title: str = "", max_cm: float | None = None) -> None:
        figure, ax = new_figure()
        ax.plot(self.frequency_cm, self.dos, color="C0")
        ax.set_xlim(0, max_cm or float(self.frequency_cm.max()))
        ax.set_xlabel("frequency (cm⁻¹)")
        ax.set_ylabel("VDOS (arb. units)")
        ax.set_title(title or "vibrational density of states")
        save_png(figure, path)


def vibrational_dos(velocities: np.ndarray, timestep_fs: float, masses: np.ndarray | None = None,
                    window: bool = True, zero_pad: int = 4) -> VDOS:
    """VDOS of ``velocities [T, N, 3]`` sampled every ``timestep_fs``; mass weighted when ``masses`` given.

    A Hann window tapers the ends to suppress leakage; the spectrum is the mass-weighted power spectrum of
    the velocities, which equals the Fourier transform of the velocity autocorrelation.  ``zero_pad``
    interpolates the spectrum on a grid that many times finer (it does not add resolution, it places peaks).
    """
    v = np.asarray(velocities, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"velocities must be [frames, atoms, 3], got {v.shape}")
    n = v.shape[0]
    weights = np.ones(v.shape[1]) if masses is None else np.asarray(masses, dtype=np.float64)
    taper = np.hanning(n) if window else np.ones(n)
    length = n * max(1, int(zero_pad))
    spectrum = np.fft.rfft(v * taper[:, None, None], n=length, axis=0)
    power = (np.abs(spectrum) ** 2 * weights[None, :, None]).sum((1, 2))
    frequency = np.fft.rfftfreq(length, d=timestep_fs) * CM_PER_FS
    dos = power / (power.sum() * (frequency[1] - frequency[0]))
    full = np.fft.rfft(v, n=2 * n, axis=0)
    acf = np.fft.irfft((np.abs(full) ** 2 * weights[None, :, None]).sum((1, 2)))[:n] / (n - np.arange(n))
    return VDOS(frequency_cm=frequency, dos=dos, vacf=acf / acf[0], timestep_fs=timestep_fs)

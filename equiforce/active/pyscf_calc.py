"""A small ASE calculator for PySCF DFT (molecules): the optional first-principles oracle.

Why our own: PySCF ships no ASE calculator in its package, and the loop needs exactly energy and
forces of a finite molecule with an unconverged SCF reported as such (so the structure is recorded as
a failure and skipped, never labelled with garbage).  ``pip install 'equiforce[pyscf]'``.
"""

from __future__ import annotations

from typing import Any

from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from equiforce.active.oracle import OracleFailure


class PySCFCalculator(Calculator):
    """Kohn–Sham DFT with PySCF: ``xc`` (e.g. ``PBE``, ``B3LYP``), ``basis`` (e.g. ``def2-SVP``).

    ``spin`` is 2S (default: 0 for an even electron count, else 1 — restricted or unrestricted KS
    accordingly); ``density_fit`` speeds up the Coulomb part; ``grids_level`` sets the DFT grid.
    ``get_property("hessian", atoms)`` gives PySCF's analytic Hessian (eV/Å², ``[3N, 3N]`` atom-major), for
    training on Hessians (:func:`equiforce.data.hessian_labels.hessian_label`); computed only when asked.
    """

    implemented_properties = ["energy", "free_energy", "forces", "hessian"]

    def __init__(self, xc: str = "PBE", basis: str = "def2-SVP", charge: int = 0, spin: int | None = None,
                 density_fit: bool = True, grids_level: int = 3, conv_tol: float = 1e-9, max_cycle: int = 100,
                 max_memory_mb: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = {"xc": xc, "basis": basis, "charge": charge, "spin": spin, "density_fit": density_fit,
                         "grids_level": grids_level, "conv_tol": conv_tol, "max_cycle": max_cycle,
                         "max_memory_mb": max_memory_mb}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        from pyscf import dft, gto

        if self.atoms.pbc.any():
            raise OracleFailure("PySCFCalculator labels molecules only (this structure is periodic)")
        s = self.settings
        n_electrons = int(self.atoms.numbers.sum()) - int(s["charge"])
        spin = s["spin"] if s["spin"] is not None else n_electrons % 2
        mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(self.atoms.numbers, self.atoms.positions)],
                    basis=s["basis"], charge=s["charge"], spin=spin, unit="Angstrom", verbose=0,
                    max_memory=s["max_memory_mb"])
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = s["xc"]
        mf.conv_tol = s["conv_tol"]
        mf.max_cycle = s["max_cycle"]
        mf.grids.level = s["grids_level"]
        if s["density_fit"]:
            mf = mf.density_fit()
        energy = mf.kernel()
        if not mf.converged:
            raise OracleFailure(f"SCF not converged in {s['max_cycle']} cycles")
        gradient = mf.nuc_grad_method().kernel()
        self.results["energy"] = self.results["free_energy"] = float(energy) * Hartree
        self.results["forces"] = -gradient * Hartree / Bohr
        if "hessian" in properties:
            blocks = mf.Hessian().kernel()  # [atom i, atom j, x_i, x_j] in Hartree/Bohr²
            n3 = 3 * len(self.atoms)
            hessian = blocks.transpose(0, 2, 1, 3).reshape(n3, n3) * Hartree / Bohr**2
            self.results["hessian"] = 0.5 * (hessian + hessian.T)

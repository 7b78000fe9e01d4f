"""Names of the uncertainty outputs a UQ model adds to the :mod:`equiforce.data.keys` prediction dict.

Conventions (every model with uncertainty, ensemble or single-model, gives the same ones, calibrated):

* ``energy_std [B]`` eV — standard deviation of the structure's energy error.
* ``forces_std [N]`` eV/Å — root-mean-square *length* of the force error vector expected on each atom
  (the convention of DeePMD's model deviation); each Cartesian component has ``forces_std / √3``.
* ``stress_std [B, 3, 3]`` eV/Å³ — per-component standard deviation (zero for non-periodic systems).
"""

ENERGY_STD = "energy_std"
FORCES_STD = "forces_std"
STRESS_STD = "stress_std"
ENERGY_MEMBERS = "energy_members"  # [M, B] eV, ensembles only
FORCES_MEMBERS = "forces_members"  # [M, N, 3] eV/Å, ensembles only

SIGMA_KEYS = {"energy": ENERGY_STD, "forces": FORCES_STD, "stress": STRESS_STD}
QUANTITIES = tuple(SIGMA_KEYS)

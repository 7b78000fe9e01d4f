"""Constants of the ZBL universal screening function (Ziegler, Biersack, Littmark 1985)."""

COULOMB_EV_A = 14.399645478425668  # e²/(4πε0) in eV·Å
PHI_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
PHI_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)

"""Names of the fields in the flat dictionary of tensors that flows through equiforce.

A batch is a ``dict[str, Tensor]``; every layer reads and writes these keys, so a model
is a checkable composition (the NequIP pattern).  Shapes: N atoms, E edges, B graphs.
"""

POSITIONS = "positions"  # [N, 3] float, Å
NUMBERS = "numbers"  # [N] long, atomic numbers
CELL = "cell"  # [B, 3, 3] float, rows are lattice vectors, Å (zeros when not periodic)
PBC = "pbc"  # [B, 3] bool
EDGE_INDEX = "edge_index"  # [2, E] long; row 0 = centre i, row 1 = neighbour j
SHIFTS = "shifts"  # [E, 3] float, integer cell shifts S: r_ij = r_j - r_i + S @ cell
BATCH = "batch"  # [N] long, graph index of each atom
PTR = "ptr"  # [B + 1] long, atom offsets of each graph
N_ATOMS = "n_atoms"  # [B] long

# labels
ENERGY = "energy"  # [B] eV
FORCES = "forces"  # [N, 3] eV/Å
STRESS = "stress"  # [B, 3, 3] eV/Å^3, ASE sign convention
HAS_ENERGY = "has_energy"  # [B] float 0/1
HAS_FORCES = "has_forces"  # [B] float 0/1
HAS_STRESS = "has_stress"  # [B] float 0/1
WEIGHT = "weight"  # [B] float, per-configuration loss weight
HESSIAN_LABEL = "hessian_label"  # [Σ 9 n_b²] float, eV/Å²: the row-major [3n, 3n] Hessians of labelled graphs only
HAS_HESSIAN = "has_hessian"  # [B] float 0/1

# predictions only
NODE_ENERGY = "node_energy"  # [N] eV
VIRIAL = "virial"  # [B, 3, 3] eV
NODE_FEATURES = "node_features"  # list of [N, C, (L+1)^2] per layer (return_features=True)
HESSIAN = "hessian"  # [3N, 3N] eV/Å^2 (single graph)
HESSIAN_VP = "hessian_vp"  # [k, N, 3] eV/Å²: the model's H·v for k random vectors v (Hessian training)
HESSIAN_VP_REF = "hessian_vp_ref"  # [k, N, 3] eV/Å²: the labels' H·v for the same vectors
HESSIAN_VP_MASK = "hessian_vp_mask"  # [N] float 0/1: atoms of graphs with a Hessian label

FLOAT_KEYS = (POSITIONS, CELL, SHIFTS, ENERGY, FORCES, STRESS, HAS_ENERGY, HAS_FORCES, HAS_STRESS, WEIGHT,
              HESSIAN_LABEL, HAS_HESSIAN)

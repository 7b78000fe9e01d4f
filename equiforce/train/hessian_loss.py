"""Training on Hessians through Hessian-vector products.

A full model Hessian costs 3N backward passes per structure; a product ``H·v`` with a random vector costs
one (the derivative of ``F·v`` with respect to the positions, ``F = -∇E``).  Matching ``H_model·v`` to
``H_label·v`` for fresh random Gaussian ``v`` every step is an unbiased estimate of matching the whole
matrices (``E‖ΔH·v‖² = ‖ΔH‖²_F``), so each step trains on the Hessian for about the price of a second force
evaluation.  The label side is a small matrix product per labelled structure.
"""

from __future__ import annotations

import torch

from equiforce.data import keys as K

Tensor = torch.Tensor


def batch_has_hessians(batch: dict[str, Tensor]) -> bool:
    """Whether any structure of the batch carries a Hessian label (from tensor shapes: no device sync)."""
    return K.HESSIAN_LABEL in batch and batch[K.HESSIAN_LABEL].numel() > 0


def label_products(batch: dict[str, Tensor], vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``H_label·v`` for ``vectors [k, N, 3]`` (zero on unlabelled structures) and the per-atom label mask [N]."""
    n_atoms = batch[K.N_ATOMS].tolist()  # host ints to slice the flat labels: one sync per labelled batch
    has = batch[K.HAS_HESSIAN].tolist()
    flat = batch[K.HESSIAN_LABEL]
    out = torch.zeros_like(vectors)
    mask = torch.zeros(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    atom, offset = 0, 0
    for n, labelled in zip(n_atoms, has):
        if labelled:
            hessian = flat[offset:offset + 9 * n * n].reshape(3 * n, 3 * n)
            block = vectors[:, atom:atom + n].reshape(-1, 3 * n)  # [k, 3n]
            out[:, atom:atom + n] = (block @ hessian.T).reshape(-1, n, 3)
            mask[atom:atom + n] = 1.0
            offset += 9 * n * n
        atom += n
    return out, mask


def hessian_vector_products(forces: Tensor, positions: Tensor, batch: dict[str, Tensor], n_vectors: int = 1,
                            generator: torch.Generator | None = None, create_graph: bool = True) -> dict[str, Tensor]:
    """The model's and the labels' ``H·v`` for ``n_vectors`` random Gaussian vectors, and the label mask.

    ``forces`` must have been computed with ``create_graph=True`` from ``positions`` (a leaf requiring grad);
    ``create_graph`` keeps the products differentiable for the loss (False for validation).
    """
    shape = (n_vectors, *positions.shape)
    vectors = torch.randn(shape, generator=generator, dtype=torch.float64).to(positions.device, positions.dtype)
    products = []
    for v in vectors:
        (grad,) = torch.autograd.grad((forces * v).sum(), positions, create_graph=create_graph, retain_graph=True)
        products.append(-grad)  # ∂(F·v)/∂r = -H·v
    reference, mask = label_products(batch, vectors)
    return {K.HESSIAN_VP: torch.stack(products), K.HESSIAN_VP_REF: reference, K.HESSIAN_VP_MASK: mask}

"""The edge tensor product with its paths kept apart carries the very terms the summed form adds up."""

from __future__ import annotations

import pytest
import torch

from equiforce.nn.irreps import spherical_harmonics
from equiforce.nn.tensor_product import EdgeTensorProduct


@pytest.mark.parametrize("lmax_in, lmax_sh, lmax_out", [(0, 3, 3), (1, 3, 3), (1, 2, 1), (2, 2, 2)])
def test_separate_paths_sum_to_the_summed_message(lmax_in, lmax_sh, lmax_out):
    torch.manual_seed(0)
    summed = EdgeTensorProduct(lmax_in, lmax_sh, lmax_out).double()
    separate = EdgeTensorProduct(lmax_in, lmax_sh, lmax_out, separate_paths=True).double()
    edges, channels = 7, 5
    h = torch.randn(edges, channels, (lmax_in + 1) ** 2, dtype=torch.float64)
    sh = spherical_harmonics(lmax_sh, torch.randn(edges, 3, dtype=torch.float64))
    weights = torch.randn(edges, channels * summed.num_paths, dtype=torch.float64)

    out = separate(h, sh, weights)
    copies = separate.copies
    into = max(sum(1 for p in summed.paths if p[2] == l3) for l3 in range(lmax_out + 1))
    assert copies == into
    assert out.shape == (edges, channels * copies, (lmax_out + 1) ** 2)
    added = out.view(edges, channels, copies, -1).sum(2) / copies**0.5
    torch.testing.assert_close(added, summed(h, sh, weights))


def test_separate_paths_keep_each_path_in_its_own_copy():
    """No copy mixes two paths: zeroing all path weights but one leaves one non-zero copy per channel."""
    torch.manual_seed(1)
    tp = EdgeTensorProduct(1, 3, 3, separate_paths=True).double()
    h = torch.randn(3, 2, 4, dtype=torch.float64)
    sh = spherical_harmonics(3, torch.randn(3, 3, dtype=torch.float64))
    for p in range(tp.num_paths):
        weights = torch.zeros(3, 2, tp.num_paths, dtype=torch.float64)
        weights[:, :, p] = 1.0
        out = tp(h, sh, weights.reshape(3, -1)).view(3, 2, tp.copies, 16)
        nonzero_copies = {int(k) for k in torch.nonzero(out.abs().sum((0, 1, 3)) > 1e-12)}
        assert len(nonzero_copies) == 1

"""Selection: farthest-point sampling spreads picks; uncertainty ranks them; the σ window filters."""

from __future__ import annotations

import numpy as np

from equiforce.active.select import Candidates, farthest_point_sampling, rank_by_uncertainty, select


def clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight clusters of 20 points each (labels 0, 1, 2), far apart."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(3), 20)
    return centres[labels] + rng.normal(0, 0.1, (60, 2)), labels


def test_fps_picks_one_point_per_cluster():
    points, labels = clusters()
    picked = farthest_point_sampling(points, 3, first=5)
    assert picked[0] == 5
    assert sorted(labels[picked].tolist()) == [0, 1, 2]


def test_fps_starting_from_a_reference_avoids_what_is_known():
    points, labels = clusters()
    known = np.array([[0.0, 0.0], [10.0, 0.0]])  # clusters 0 and 1 are already labelled
    picked = farthest_point_sampling(points, 1, reference=known)
    assert labels[picked[0]] == 2


def test_fps_returns_each_point_once():
    points, _ = clusters()
    picked = farthest_point_sampling(points[:5], 10)
    assert sorted(picked) == [0, 1, 2, 3, 4]


def test_uncertainty_ranking_is_descending_and_stable():
    sigma = np.array([0.1, 0.5, 0.3, 0.5, 0.0])
    assert rank_by_uncertainty(sigma).tolist() == [1, 3, 2, 0, 4]


def test_selection_window_and_diversity():
    points, labels = clusters()
    sigma = np.linspace(0.2, 0.8, 60)
    sigma[labels == 2] = 0.9  # cluster 2 is the most uncertain ...
    sigma[0] = 50.0  # ... and one broken geometry is far above the window
    closest = np.full(60, 1.0)
    closest[1] = 0.2  # two atoms on top of each other
    cands = Candidates(sigma=sigma, descriptors=points, min_distance=closest)
    picked = select(cands, 3, "uncertainty_fps", sigma_min=0.25, sigma_max=5.0, min_distance=0.5, pool_factor=20)
    assert 0 not in picked and 1 not in picked
    assert all(sigma[i] >= 0.25 for i in picked)
    assert sorted(labels[picked].tolist()) == [0, 1, 2]  # diverse, not three points of cluster 2
    only_uncertain = select(cands, 3, "uncertainty", sigma_min=0.25, sigma_max=5.0)
    assert all(labels[i] == 2 for i in only_uncertain)


def test_selection_fills_the_budget_below_the_window_but_never_above():
    sigma = np.array([0.01, 0.02, 0.03, 99.0])
    cands = Candidates(sigma=sigma, descriptors=np.eye(4), min_distance=np.ones(4))
    picked = select(cands, 3, "uncertainty_fps", sigma_min=0.5, sigma_max=1.0)
    assert picked == [2, 1, 0]
    assert select(cands, 2, "random", sigma_max=1.0, rng=np.random.default_rng(1)) != []
    assert 3 not in select(cands, 4, "random", sigma_max=1.0)


def test_unseen_elements_infinite_sigma_are_never_picked():
    sigma = np.array([np.inf, 0.4, 0.3])
    cands = Candidates(sigma=sigma, descriptors=np.eye(3), min_distance=np.ones(3))
    assert 0 not in select(cands, 3, "uncertainty_fps")


def test_broken_molecules_are_never_picked():
    sigma = np.array([0.9, 0.8, 0.7])
    cands = Candidates(sigma=sigma, descriptors=np.eye(3), min_distance=np.ones(3),
                       bond_deviation=np.array([1.2, 0.1, 0.2]))
    assert sorted(select(cands, 3, "uncertainty_fps", max_bond_deviation=0.5)) == [1, 2]


def test_random_fraction_draws_plain_samples_from_the_marked_pool_and_fps_avoids_them():
    points, labels = clusters()
    sigma = np.full(60, 0.1)
    sigma[labels == 2] = 0.9  # uncertainty alone would take only cluster 2
    md = labels != 1  # cluster 1 is "rattled copies": never a random pick
    cands = Candidates(sigma=sigma, descriptors=points, min_distance=np.ones(60))
    picked = select(cands, 10, "uncertainty", sigma_min=0.5, random_fraction=0.3, random_pool=md,
                    rng=np.random.default_rng(3))
    assert len(picked) == len(set(picked)) == 10
    hedge, rest = picked[:3], picked[3:]
    assert all(md[i] for i in hedge)
    assert all(labels[i] == 2 for i in rest)
    # with FPS the random picks count as selected: the strategy's two picks go to the other clusters
    only_cluster0 = labels == 0
    picked = select(cands, 3, "fps", random_fraction=0.34, random_pool=only_cluster0, rng=np.random.default_rng(0))
    assert labels[picked[0]] == 0
    assert sorted(labels[picked[1:]].tolist()) == [1, 2]


def test_random_fraction_outside_zero_one_is_an_error():
    cands = Candidates(sigma=np.ones(3), descriptors=np.eye(3), min_distance=np.ones(3))
    try:
        select(cands, 2, "uncertainty_fps", random_fraction=1.0)
    except ValueError as err:
        assert "random_fraction" in str(err)
    else:
        raise AssertionError("random_fraction=1 accepted")

"""PRDC (Kynkäänniemi et al. 2019; Naeem et al. 2020) on point clouds whose answers are exact."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.metrics.prdc import knn_radii, prdc, prdc_from_distances


def cloud(n: int, seed: int, centre: float = 0.0, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) + centre


def test_identical_sets_give_full_precision_recall_coverage_and_density_k_plus_1_over_k():
    x = cloud(200, 0)
    for k in (1, 5):
        out = prdc(x, x, k)
        # each point lies in its own ball and in the balls of the k points it is a neighbour of:
        # sum_j #{i : y_j in B(x_i)} = sum_i (k + 1), so density = (k + 1) / k exactly
        assert out == {"precision": 1.0, "recall": 1.0, "coverage": 1.0,
                       "density": pytest.approx((k + 1) / k)}


def test_a_far_shifted_copy_scores_zero_everywhere():
    x = cloud(150, 1)
    assert prdc(x, x + 100.0, 5) == {"precision": 0.0, "recall": 0.0, "density": 0.0,
                                     "coverage": 0.0}


def test_fakes_covering_one_of_two_far_modes_keep_precision_and_lose_half_the_recall():
    a, b = cloud(120, 2), cloud(80, 3, centre=100.0)
    real = torch.cat([a, b])
    out = prdc(real, a, 5)
    # every fake is a real point (in its own ball); only mode a's real points are reached
    assert out["precision"] == 1.0
    assert out["recall"] == pytest.approx(120 / 200)
    assert out["coverage"] == pytest.approx(120 / 200)
    # the fakes hit exactly the balls they hit within mode a: density (k + 1) / k as above
    assert out["density"] == pytest.approx(6 / 5)


def test_knn_radius_is_the_kth_distance_to_another_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    radii = knn_radii(torch.cdist(x, x), 2)
    assert radii.tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than 4 distinct points"):
        knn_radii(torch.cdist(x, x), 4)


def test_copies_from_resampling_are_not_each_others_neighbours():
    x, y = cloud(40, 4), cloud(40, 5, centre=0.3)
    g = torch.Generator().manual_seed(6)
    ix, iy = torch.randint(40, (40,), generator=g), torch.randint(40, (40,), generator=g)
    fast = prdc_from_distances(torch.cdist(x, x)[ix][:, ix], torch.cdist(y, y)[iy][:, iy],
                               torch.cdist(x, y)[ix][:, iy], 5, real_ids=ix, fake_ids=iy)

    # by hand, row by row: the k-th nearest row of the resample that is another point
    # (copies of other points count, copies of the point itself do not)
    def radii(points: torch.Tensor, ids: torch.Tensor) -> list[float]:
        out = []
        for i in range(len(ids)):
            others = sorted(float((points[ids[i]] - points[ids[j]]).norm())
                            for j in range(len(ids)) if ids[j] != ids[i])
            out.append(others[4])
        return out

    rx, ry = radii(x, ix), radii(y, iy)
    real, fake = x[ix], y[iy]
    dist = [[float((real[i] - fake[j]).norm()) for j in range(40)] for i in range(40)]
    precision = sum(any(dist[i][j] <= rx[i] for i in range(40)) for j in range(40)) / 40
    recall = sum(any(dist[i][j] <= ry[j] for j in range(40)) for i in range(40)) / 40
    density = sum(dist[i][j] <= rx[i] for i in range(40) for j in range(40)) / (5 * 40)
    coverage = sum(min(dist[i]) <= rx[i] for i in range(40)) / 40
    assert fast == {"precision": pytest.approx(precision), "recall": pytest.approx(recall),
                    "density": pytest.approx(density), "coverage": pytest.approx(coverage)}
    assert 0 < fast["precision"] < 1 or 0 < fast["recall"] < 1  # not a degenerate case

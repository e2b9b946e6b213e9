"""Fréchet distance, KID, SWD and the shared floor / bootstrap helper, against exact answers.

FD is checked against the closed form of two Gaussians (sets built to have exactly the
prescribed sample mean and covariance, so the only error is rounding), KID against the
unbiased MMD^2 written out term by term, the metrics end to end on Gaussian data in the feature
space of a (fixed, untrained) classifier: same distribution within the floor, a shift clearly
worse. Every draw is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_kit import Diffusion
from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics import FrechetDistance, KernelDistance, SlicedWasserstein
from diffusers_kit.metrics.fd import frechet_distance
from diffusers_kit.metrics.floor import (
    ErrorBars,
    mean_with_interval,
    real_sets,
    sampling_interval,
    summarize,
)
from diffusers_kit.metrics.kid import Kernels, full_set_kid, kernel_distance
from diffusers_kit.metrics.swd import (
    random_directions,
    resample_sorted,
    sliced_wasserstein,
    sorted_projections,
)
from diffusers_kit.networks import NoiseAwareClassifier
from diffusers_kit.objectives import NoisyClassification
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes import VE


def exact_moments(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n points whose sample mean is ``mean`` and unbiased sample covariance ``cov``, exactly."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1)))
    z = z @ whiten.T  # sample covariance exactly I
    return torch.from_numpy(mean + z @ np.linalg.cholesky(cov).T)


def closed_form_fd(m1, s1, m2, s2) -> float:
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)), by symmetric eigh."""
    def sqrtm(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root = sqrtm(s1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(root @ s2 @ root)))


def random_cov(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_of_two_gaussians_equals_the_closed_form():
    d = 6
    m1, m2 = np.zeros(d), np.linspace(-1, 1, d)
    s1, s2 = random_cov(d, 1), random_cov(d, 2)
    a, b = exact_moments(m1, s1, 400, 3), exact_moments(m2, s2, 300, 4)
    assert frechet_distance(a, b) == pytest.approx(closed_form_fd(m1, s1, m2, s2), rel=1e-8)
    # diagonal covariances, by hand: ||m1 - m2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu = np.array([1.0, 0.0, -2.0])
    a = exact_moments(np.zeros(3), np.diag(va), 200, 5)
    b = exact_moments(mu, np.diag(vb), 200, 6)
    hand = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2
    assert frechet_distance(a, b) == pytest.approx(hand, rel=1e-8)


def test_fd_and_kid_of_a_set_against_itself_are_zero():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-8
    # the unbiased MMD^2 of a set with itself is not exactly 0: the cross term keeps the
    # diagonal k(x_i, x_i), the within terms do not, so KID(x, x) = 2/n (mean_off - mean_diag),
    # O(1/n) and small beside any real difference
    k = (x @ x.T / 8 + 1) ** 3
    n = len(x)
    mean_diag = float(k.diagonal().mean())
    mean_off = float((k.sum() - k.diagonal().sum()) / (n * (n - 1)))
    mean, std = kernel_distance(x, x, subsets=1, subset_size=n,
                                generator=torch.Generator().manual_seed(0))
    assert mean == pytest.approx(2 / n * (mean_off - mean_diag), rel=1e-9) and std == 0
    assert full_set_kid(x, x) == pytest.approx(mean, rel=1e-12)
    assert abs(mean) < 0.1 * full_set_kid(x, x + 0.5)


def test_kid_is_the_unbiased_mmd_with_the_cubic_polynomial_kernel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 5, generator=g, dtype=torch.float64) + 0.3
    k = lambda u, v: (float(u @ v) / 5 + 1) ** 3  # noqa: E731
    n = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(n) for j in range(n))
    by_hand = within / (n * (n - 1)) - 2 * cross / n**2
    assert full_set_kid(x, y) == pytest.approx(by_hand, rel=1e-10)
    mean, _ = kernel_distance(x, y, subsets=3, subset_size=n, generator=g)
    assert mean == pytest.approx(by_hand, rel=1e-10)  # every subset is the whole set
    everything = torch.arange(n)
    # the kernel matrix is the pooled sets' [x; y]: y's rows follow x's
    assert Kernels(x, y).kid(everything, n + everything) == pytest.approx(by_hand, rel=1e-10)
    index = torch.randint(n, (n,), generator=g)
    other = torch.randint(n, (n,), generator=g)
    # the kernel-indexing route of the bootstrap is the same estimator on the resampled sets
    assert Kernels(x, y).kid(index, n + other) == pytest.approx(
        full_set_kid(x[index], y[other]), rel=1e-10)


def test_swd_resampled_from_sorted_projections_equals_sorting_the_resample():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = torch.randn(50, 7, generator=g, dtype=torch.float64)
    directions = random_directions(7, 33, g)
    index = torch.randint(50, (50,), generator=g)
    values, order = sorted_projections(x, directions)
    # equal up to the rounding of projecting another batch of rows
    torch.testing.assert_close(resample_sorted(values, order, index),
                               sorted_projections(x[index], directions)[0],
                               rtol=0, atol=1e-12)
    direct = sliced_wasserstein(x[index], y, directions)
    fast = float((resample_sorted(values, order, index) - sorted_projections(y, directions)[0])
                 .pow(2).mean().sqrt())
    assert fast == pytest.approx(direct, rel=1e-12)


def test_mean_interval_matches_the_normal_approximation_for_a_proportion():
    values = torch.zeros(400)
    values[:360] = 1.0  # p = 0.9
    out = mean_with_interval("acc", values, torch.Generator().manual_seed(0),
                             ErrorBars(4000, 0.95))
    half = 1.959964 * math.sqrt(0.9 * 0.1 / 400)
    assert out["acc"] == pytest.approx(0.9)
    assert out["acc_low"] == pytest.approx(0.9 - half, abs=0.2 * half)
    assert out["acc_high"] == pytest.approx(0.9 + half, abs=0.2 * half)
    assert out["acc_n"] == 400


def test_sampling_interval_is_centred_on_the_estimate_and_clipped():
    # a statistic whose replicates are shifted by +5 (a bias): the interval ignores the shift;
    # it is the mean of the first set's rows: 100 zeros, then 100 ones in the second set, so
    # V_half = 0 and V = V_perm, the variance of the mean of 100 of the 200 values drawn
    # without replacement
    x = torch.cat([torch.zeros(100), torch.ones(100)]).double()

    def replicates(ia, ib):
        return {"s": 5.0 + float(x[ia].mean())}

    interval = sampling_interval({"s": 0.03}, replicates, (100, 100),
                                 torch.Generator().manual_seed(0), ErrorBars(2000, 0.9),
                                 bounds={"s": (0.0, math.inf)})
    low, high = interval["s"]
    assert low == 0.0  # clipped at the metric's range
    half = 1.644854 * math.sqrt(0.25 / 100 * 100 / 199)  # finite-population correction
    assert high == pytest.approx(0.03 + half, rel=0.05)


def test_summary_rows_fold_floor_interval_and_n_into_one_line():
    rows = dict(summarize({"fd": 1.5, "fd_floor": 0.5, "fd_low": 1.0, "fd_high": 2.0,
                           "fd_floor_low": 0.2, "fd_floor_high": 0.8, "fd_n": 360.0,
                           "train_loss": 0.25, "kid": float("nan")}))
    assert rows == {"fd": "1.5 [1, 2]  floor 0.5 [0.2, 0.8]  n=360", "train_loss": "0.25",
                    "kid": "n/a"}


# -- end to end in a feature space ---------------------------------------------------------------
D = 8


def gaussian_splits(n_train: int = 1200, n_heldout: int = 300) -> DataSplits:
    g = torch.Generator().manual_seed(10)
    return DataSplits(train=torch.randn(n_train, D, generator=g),
                      heldout=torch.randn(n_heldout, D, generator=g))


def feature_model(data: DataSplits) -> TrainedModel:
    torch.manual_seed(0)  # a fixed random classifier: a deterministic nonlinear feature map
    network = NoiseAwareClassifier(num_classes=3, channels=16, data_shape=(D,))
    diffusion = Diffusion(VE(sigma_min=0.01, sigma_max=1.0), network,
                          NoisyClassification(time=0.0), device="cpu")
    return TrainedModel.from_diffusion(diffusion, data)


@pytest.mark.parametrize("metric_class", [FrechetDistance, KernelDistance])
def test_same_distribution_is_within_the_floor_and_a_shift_is_clearly_worse(metric_class):
    data = gaussian_splits()
    metric = metric_class(feature_model(data), resamples=100)
    key = metric.name
    g = torch.Generator().manual_seed(20)
    same = torch.randn(300, D, generator=g)
    shifted = torch.randn(300, D, generator=g) + 1.0
    a = metric.evaluate(same, data, torch.Generator().manual_seed(0))
    b = metric.evaluate(shifted, data, torch.Generator().manual_seed(0))
    assert a[f"{key}_n"] == 300
    assert a[f"{key}_floor"] == b[f"{key}_floor"]  # the floor does not depend on the samples
    assert a[key] <= a[f"{key}_floor_high"]
    assert a[f"{key}_low"] <= a[key] <= a[f"{key}_high"]
    # the shifted set: far above the floor's whole interval and its own interval excludes it
    assert b[key] > 5 * a[f"{key}_floor_high"]
    assert b[f"{key}_low"] > a[f"{key}_floor_high"]


def test_swd_reports_floor_interval_and_ratio():
    data = gaussian_splits()
    metric = SlicedWasserstein(projections=256, resamples=100)
    g = torch.Generator().manual_seed(21)
    same = metric.evaluate(torch.randn(300, D, generator=g), data,
                           torch.Generator().manual_seed(0))
    shifted = metric.evaluate(torch.randn(300, D, generator=g) + 1.0, data,
                              torch.Generator().manual_seed(0))
    assert same["swd_ratio"] == pytest.approx(same["swd"] / same["swd_floor"])
    assert same["swd"] <= same["swd_floor_high"]
    assert shifted["swd_low"] > 3 * same["swd_floor_high"]


def test_every_metric_of_a_run_draws_the_same_real_subset_for_its_floor():
    data = gaussian_splits()
    g = torch.Generator().manual_seed(7)
    first = real_sets(torch.zeros(100, D), data, g)
    torch.randint(10, (5,), generator=g)  # another metric used the run's generator meanwhile
    second = real_sets(torch.zeros(100, D), data, g)
    assert torch.equal(first.real_index, second.real_index)
    assert first.n == 100 and torch.equal(first.reference, data.heldout[:100])

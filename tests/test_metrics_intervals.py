"""Calibration of the distribution metrics' intervals (diffusers_kit.metrics.floor).

Features are Gaussian, so the true sampling spread of each statistic is known by simulation:
the statistic of many independent pairs of fresh sets. An interval is calibrated when it covers
the mean of that distribution as often as its level says and is as wide as its spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_kit.metrics.fd import frechet_distance
from diffusers_kit.metrics.floor import ErrorBars, RealSets, compare_with_floor
from diffusers_kit.metrics.kid import full_set_kid
from diffusers_kit.metrics.prdc import prdc

N = 100  # examples per set
TRUTH = 200  # independent pairs giving the true sampling distribution
REPLICATIONS = 25  # data sets whose intervals are checked (two intervals each: value, floor)
RESAMPLES = 60

STATISTICS = {
    "fd": lambda a, b: {"fd": frechet_distance(a, b)},
    "kid": lambda a, b: {"kid": full_set_kid(a, b)},
    "prdc": lambda a, b: prdc(b, a),
}


def calibration(d: int) -> dict[str, tuple[int, int, float]]:
    """Per statistic: (intervals covering E[D], intervals, mean width / true central 95 %
    spread), for samples, real set and reference all N(0, I_d)."""
    g = torch.Generator().manual_seed(d)

    def draw() -> torch.Tensor:
        return torch.randn(N, d, generator=g, dtype=torch.float64)

    out = {}
    for name, statistic in STATISTICS.items():
        truth = [statistic(draw(), draw()) for _ in range(TRUTH)]
        for key in truth[0]:
            out[key] = (0, 0, 0.0)
        values = {key: np.array([t[key] for t in truth]) for key in truth[0]}
        for r in range(REPLICATIONS):
            sets = RealSets(draw(), draw(), draw(), N, torch.arange(N))
            figures = compare_with_floor(name, statistic, sets, torch.Generator().manual_seed(r),
                                         ErrorBars(RESAMPLES, 0.95))
            for key, v in values.items():
                covered, count, width = out[key]
                for role in ("", "_floor"):
                    low, high = figures[f"{key}{role}_low"], figures[f"{key}{role}_high"]
                    covered += int(low <= v.mean() <= high)
                    count += 1
                    width += high - low
                out[key] = (covered, count, width)
        for key, v in values.items():
            covered, count, width = out[key]
            spread = np.quantile(v, 0.975) - np.quantile(v, 0.025)
            out[key] = (covered, count, width / count / spread)
    return out


@pytest.mark.parametrize("d", [8, 64])
def test_intervals_cover_the_mean_at_their_level_and_are_as_wide_as_the_true_spread(d):
    table = calibration(d)
    # every statistic's interval is about as wide as the true central 95 % spread (the bootstrap
    # it replaces was 1.3-2.9 times wider; taking the larger of two noisy variances makes it
    # ~1.2 times for FD and KID with 60 resamples)
    for key, (_, _, ratio) in table.items():
        assert 0.75 < ratio < 1.35, (key, ratio)
    # pooled over the six statistics: 300 intervals; for a true coverage of 0.95 the count's
    # standard error is 0.0126, so [0.90, 0.98] is -4 to +2.4 standard errors
    covered = sum(c for c, _, _ in table.values())
    count = sum(n for _, n, _ in table.values())
    assert 0.90 <= covered / count <= 0.98, table

"""Sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015).

``SWD(P, Q) = ( E_theta [ W_2^2(theta # P, theta # Q) ] )^(1/2)`` over random unit directions
``theta``. For two samples of equal size n the 1-D W_2 is exact: sort both projections and
compare order statistics, ``W_2^2 = mean_k (a_(k) - b_(k))^2``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import ErrorBars, Level, Resamples, compare_with_floor, real_sets

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def random_directions(
    dim: int, count: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``count`` directions uniform on the unit sphere in R^dim, as a ``(dim, count)`` matrix."""
    theta = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    return (theta / theta.norm(dim=0, keepdim=True)).to(device)


def sorted_projections(x: torch.Tensor, directions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections of ``x`` (flattened) on each direction, sorted: ``(values, order)``, both
    ``(directions, n)``; ``order`` holds the example index of each sorted value."""
    projected = (x.flatten(1).to(directions.dtype) @ directions).T.contiguous()
    return projected.sort(dim=1)


def resample_sorted(values: torch.Tensor, order: torch.Tensor, index: torch.Tensor
                    ) -> torch.Tensor:
    """The sorted projections of ``x[index]`` from those of ``x``, without sorting again.

    Drawing with replacement repeats example i ``c_i`` times, so in each direction the sorted
    resample is the sorted sample with every value repeated by its example's count.
    """
    counts = torch.bincount(index, minlength=values.shape[1])[order]  # in sorted order
    repeated = values.flatten().repeat_interleave(counts.flatten())
    return repeated.view(values.shape[0], len(index))


def wasserstein_of_sorted(pa: torch.Tensor, pb: torch.Tensor) -> float:
    """``(mean over directions and ranks of (a_(k) - b_(k))^2)^(1/2)`` of sorted projections."""
    return float((pa - pb).pow(2).mean().sqrt())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """SWD between equally sized samples ``a`` and ``b`` (flattened to vectors)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"samples must have the same size, got {a.shape[0]} and {b.shape[0]}")
    return wasserstein_of_sorted(sorted_projections(a.double(), directions)[0],
                                 sorted_projections(b.double(), directions)[0])


class SlicedWasserstein(Metric):
    """Sliced Wasserstein distance to held-out data, beside its real-vs-real noise floor.

    Reports ``swd`` (samples vs held-out), ``swd_floor`` (a same-size random subset of the
    training data vs the same held-out points, same directions), their bootstrap intervals
    (``swd_low`` / ``swd_high``, ``swd_floor_low`` / ``swd_floor_high``; see
    :mod:`diffusers_kit.metrics.floor`) and ``swd_ratio`` = swd / floor. A ratio near 1 means the
    samples are as close to the held-out data as real data is.

    Args:
        projections: random directions.
        resamples: bootstrap resamples for the intervals (0: none).
        level: confidence level of the intervals.
    """

    def __init__(self, projections: Annotated[int, Field(ge=1, le=65_536)] = 1024,
                 resamples: Resamples = 100, level: Level = 0.95) -> None:
        self.projections = projections
        self.bars = ErrorBars(resamples, level)

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        sets = real_sets(samples, data, generator)
        directions = random_directions(sets.reference[0].numel(), self.projections, generator)

        projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def sorted_of(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if id(a) not in projected:
                projected[id(a)] = sorted_projections(a, directions)
            return projected[id(a)]

        def statistic(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            return {"swd": wasserstein_of_sorted(sorted_of(a)[0], sorted_of(b)[0])}

        pools: dict[int, torch.Tensor] = {}

        def replicates(a: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> dict[str, float]:
            # the same statistic on (pool[ia], pool[ib]), pool = [a; reference], from the
            # pool's sorted projections
            if id(a) not in pools:
                pools[id(a)] = torch.cat([a, sets.reference])
            pool = sorted_of(pools[id(a)])
            return {"swd": wasserstein_of_sorted(resample_sorted(*pool, ia),
                                                 resample_sorted(*pool, ib))}

        out = compare_with_floor("swd", statistic, sets, generator, self.bars,
                                 replicates=replicates, bounds={"swd": (0.0, float("inf"))})
        out["swd_ratio"] = out["swd"] / out["swd_floor"] if out["swd_floor"] > 0 else math.nan
        return out

"""Sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015).

``SWD(P, Q) = ( E_theta [ W_2^2(theta # P, theta # Q) ] )^(1/2)`` over random unit directions
``theta``. For two samples of equal size n the 1-D W_2 is exact: sort both projections and
compare order statistics, ``W_2^2 = mean_k (a_(k) - b_(k))^2``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.base import Metric

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def random_directions(
    dim: int, count: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``count`` directions uniform on the unit sphere in R^dim, as a ``(dim, count)`` matrix."""
    theta = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    return (theta / theta.norm(dim=0, keepdim=True)).to(device)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """SWD between equally sized samples ``a`` and ``b`` (flattened to vectors)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"samples must have the same size, got {a.shape[0]} and {b.shape[0]}")
    pa = torch.sort(a.flatten(1).double() @ directions, dim=0).values
    pb = torch.sort(b.flatten(1).double() @ directions, dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


class SlicedWasserstein(Metric):
    """Sliced Wasserstein distance to held-out data, beside its real-vs-real noise floor.

    Reports ``swd`` (samples vs held-out), ``swd_floor`` (a same-size random subset of the
    training data vs the same held-out points, same directions) and ``swd_ratio`` = swd / floor.
    A ratio near 1 means the samples are as close to the held-out data as real data is.
    """

    def __init__(self, projections: Annotated[int, Field(ge=1, le=65_536)] = 1024) -> None:
        self.projections = projections

    def evaluate(
        self,
        samples: torch.Tensor,
        data: DataSplits,
        generator: torch.Generator,
        model: ScoreModel | None = None,
    ) -> dict[str, float]:
        n = min(len(samples), len(data.heldout), len(data.train))
        reference = data.heldout[:n]
        real = data.train[torch.randperm(len(data.train), generator=generator)[:n]]
        directions = random_directions(reference[0].numel(), self.projections, generator)
        swd = sliced_wasserstein(samples[:n].cpu(), reference, directions)
        floor = sliced_wasserstein(real, reference, directions)
        return {"swd": swd, "swd_floor": floor, "swd_ratio": swd / floor, "swd_n": float(n)}

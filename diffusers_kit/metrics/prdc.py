"""Precision, recall, density and coverage of samples (Kynkäänniemi et al. 2019; Naeem et al.
2020), in a trained classifier's feature space, with k = 5 nearest neighbours.

Each real point ``x_i`` gets a ball of radius ``r_i``, the distance to its k-th nearest real
neighbour (itself excluded); each fake point ``y_j`` likewise ``s_j`` among fakes. With N real
and M fake points:

    precision = 1/M sum_j 1[ exists i: ||y_j - x_i|| <= r_i ]     (fakes inside the real manifold)
    recall    = 1/N sum_i 1[ exists j: ||x_i - y_j|| <= s_j ]     (reals inside the fake manifold)
    density   = 1/(kM) sum_j sum_i 1[ ||y_j - x_i|| <= r_i ]      (how many real balls, / k)
    coverage  = 1/N sum_i 1[ min_j ||x_i - y_j|| <= r_i ]         (real balls holding a fake)

Precision and density measure fidelity, recall and coverage diversity; density is about 1 (and
may exceed it) for samples distributed like the real data. Precision, recall and coverage lie in
[0, 1]. A point is never its own neighbour, nor are its copies (the bootstrap draws with
replacement; ``real_ids`` / ``fake_ids`` say which rows are the same point); copies of other
points count as neighbours, as in the resampled set they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.features import FeatureMetric
from diffusers_kit.metrics.floor import Level, Resamples, compare_with_floor
from diffusers_kit.references import TrainedModel

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

NAMES = ("precision", "recall", "density", "coverage")


def knn_radii(distances: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour, given the ``(n, n)`` distances
    within its set; a point and its copies (same id; the point itself always) are excluded."""
    n = len(distances)
    same = torch.eye(n, dtype=torch.bool) if ids is None else ids[:, None] == ids[None, :]
    distinct = n if ids is None else len(ids.unique())
    if distinct <= k:
        raise ValueError(f"PRDC with k = {k} needs more than {k} distinct points per set; "
                         f"there are {distinct}")
    masked = distances.masked_fill(same, float("inf"))
    return masked.topk(k, dim=1, largest=False).values[:, -1]


def prdc_from_distances(real_real: torch.Tensor, fake_fake: torch.Tensor,
                        real_fake: torch.Tensor, k: int = 5,
                        real_ids: torch.Tensor | None = None,
                        fake_ids: torch.Tensor | None = None) -> dict[str, float]:
    """PRDC from the pairwise distances within the real set ``(N, N)``, within the fake set
    ``(M, M)`` and between them ``(N, M)`` (module docstring)."""
    r = knn_radii(real_real, k, real_ids)  # (N,)
    s = knn_radii(fake_fake, k, fake_ids)  # (M,)
    in_real_ball = real_fake <= r[:, None]
    return {
        "precision": float(in_real_ball.any(dim=0).double().mean()),
        "recall": float((real_fake <= s[None, :]).any(dim=1).double().mean()),
        "density": float(in_real_ball.double().sum() / (k * real_fake.shape[1])),
        "coverage": float((real_fake.min(dim=1).values <= r).double().mean()),
    }


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (module docstring)."""
    real, fake = real.double().flatten(1), fake.double().flatten(1)
    return prdc_from_distances(torch.cdist(real, real), torch.cdist(fake, fake),
                               torch.cdist(real, fake), k)


class PrecisionRecall(FeatureMetric):
    """Precision, recall, density and coverage of samples against held-out data, each beside
    its real-vs-real floor and with a bootstrap interval (``precision``, ``precision_floor``,
    ``precision_low``, ... ``coverage_n``).

    Args:
        features: the trained classifier whose penultimate layer is the feature space.
        k: nearest neighbours defining the balls (5 in both papers).
        resamples: bootstrap resamples for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "prdc"

    def __init__(self, features: TrainedModel, k: Annotated[int, Field(ge=1, le=100)] = 5,
                 resamples: Resamples = 100, level: Level = 0.95) -> None:
        super().__init__(features, resamples, level)
        self.k = k

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        sets, fake, reference, real = self.embedded_sets(samples, data, generator)

        distances: dict[int, torch.Tensor] = {}

        def pooled(a: torch.Tensor) -> torch.Tensor:
            # distances within [a; reference], computed once per set
            if id(a) not in distances:
                pool = torch.cat([a, reference])
                distances[id(a)] = torch.cdist(pool, pool)
            return distances[id(a)]

        def subsets(a: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> dict[str, float]:
            # prdc(pool[ib], pool[ia]) by indexing the pooled distances
            within = pooled(a)
            return prdc_from_distances(within[ib][:, ib], within[ia][:, ia], within[ib][:, ia],
                                       self.k)

        def statistic(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            # b, the held-out reference, is the real manifold
            return subsets(a, torch.arange(len(a)), len(a) + torch.arange(len(b)))

        def replicates(a: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> dict[str, float]:
            return subsets(a, ia, ib)

        bounds = {"precision": (0.0, 1.0), "recall": (0.0, 1.0), "coverage": (0.0, 1.0),
                  "density": (0.0, float("inf"))}
        return compare_with_floor(self.name, statistic, sets, generator, self.bars,
                                  samples=fake, reference=reference, real=real,
                                  replicates=replicates, bounds=bounds)


__all__ = ["NAMES", "PrecisionRecall", "knn_radii", "prdc", "prdc_from_distances"]

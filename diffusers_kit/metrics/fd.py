"""Fréchet distance in a trained classifier's feature space (Heusel et al. 2017, "FID").

Both sets of features are summarised by a Gaussian, ``N(mu_1, S_1)`` and ``N(mu_2, S_2)`` (sample
mean and unbiased sample covariance), and compared by the Fréchet (2-Wasserstein) distance
between those Gaussians (Dowson & Landau 1982):

    FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

The matrix square root is torchmetrics' (``FrechetInceptionDistance`` with this project's
feature network in place of Inception): the trace of ``(S_1 S_2)^(1/2)`` is the sum of the
square roots of the eigenvalues of ``S_1 S_2``, in float64. FD is biased upwards at finite n
(two samples of one distribution give FD > 0), which is why it is read beside its floor.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.features import FeatureMetric
from diffusers_kit.metrics.floor import Level, Resamples, compare_with_floor
from diffusers_kit.references import TrainedModel

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


class Precomputed(nn.Module):
    """The identity, as torchmetrics' feature extractor: features are computed once, by
    :class:`~diffusers_kit.metrics.features.FeatureSpace`, and resampled for the bootstrap."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@functools.lru_cache(maxsize=8)
def _metric(dim: int) -> Any:
    # one torchmetrics object per feature width, reset between uses: building one costs as much
    # as the computation itself, and the bootstrap calls this hundreds of times
    # imported here: torchmetrics' image package imports transformers when it is installed,
    # seconds that every dkit command would pay at start-up
    from diffusers_kit.metrics.fidelity import torchmetrics_image

    return torchmetrics_image("fid").FrechetInceptionDistance(feature=Precomputed(dim))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between the Gaussians fitted to feature sets ``a`` and ``b`` (``(n, d)``, n >= 2)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    metric = _metric(a.shape[1])
    metric.reset()
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


class FrechetDistance(FeatureMetric):
    """Fréchet distance of samples to held-out data in a classifier's feature space, beside its
    real-vs-real floor, with a bootstrap interval (``fd``, ``fd_floor``, ``fd_low``, ...).

    Args:
        features: the trained classifier whose penultimate layer is the feature space (a spec
            such as ``features_digits.yaml``, or a run folder).
        resamples: bootstrap resamples for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "fd"

    def __init__(self, features: TrainedModel, resamples: Resamples = 200,
                 level: Level = 0.95) -> None:
        super().__init__(features, resamples, level)

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        sets, fake, reference, real = self.embedded_sets(samples, data, generator)

        def statistic(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            return {"fd": frechet_distance(a, b)}

        return compare_with_floor(self.name, statistic, sets, generator, self.bars,
                                  samples=fake, reference=reference, real=real,
                                  bounds={"fd": (0.0, float("inf"))})


__all__ = ["FrechetDistance", "Precomputed", "frechet_distance"]

"""Measurement consistency of restorations (kind ``metric``, ``consistency``).

For an inverse problem ``y = A(x) + noise``, a restoration ``x`` should reproduce its
measurement: ``||y - A x||_2 / sqrt(m)``, the RMS residual over the ``m`` measured values, in
data units. An exact posterior sample leaves about ``sigma_y`` (the noise it must explain), 0
without noise; a method that ignores the measurement leaves the spread of ``A x`` itself.

As for PSNR and SSIM, sample ``i`` is taken to restore held-out example ``i``, whose noiseless
measurement ``A(heldout[i])`` is the reference; a restoration run (``dkit restore``, the
``restore:`` section) reports the same figure against the noisy ``y`` it actually measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import ErrorBars, Level, Resamples, mean_with_interval

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def consistency(operator: ForwardModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||y - A x||_2 / sqrt(m)`` per row: the RMS measurement residual in data units."""
    residual = (y.to(x.dtype) - operator.A(x)).flatten(1)
    return residual.pow(2).mean(1).sqrt()


class Consistency(Metric):
    """RMS measurement residual of each restoration against the measurement of its held-out
    original (``consistency``, ``_std``, ``_low``, ``_high``, ``_n``).

    Args:
        operator: the forward model of the inverse problem.
        resamples: bootstrap resamples for the interval of the mean (0: none).
        level: confidence level of the interval.
    """

    def __init__(self, operator: ForwardModel, resamples: Resamples = 1000,
                 level: Level = 0.95) -> None:
        self.operator = operator
        self.bars = ErrorBars(resamples, level)

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        n = min(len(samples), len(data.heldout))
        x = samples[:n].detach().double().cpu()
        y = self.operator.A(data.heldout[:n].double().cpu())
        return mean_with_interval("consistency", consistency(self.operator, x, y), generator,
                                  self.bars)


__all__ = ["Consistency", "consistency"]

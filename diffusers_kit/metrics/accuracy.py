"""Held-out accuracy of a classifier model (kind ``metric``, ``accuracy``).

For a spec that trains a classifier (``network: {kind: classifier}``, objective
``classification``) and draws no samples: the fraction of held-out examples whose most likely
class is their label, ``1/n sum_i 1[argmax_y p(y | x_i) = y_i]``, with the percentile bootstrap
interval of that mean (:mod:`diffusers_kit.metrics.floor`). At ``time`` > 0 the examples are
first noised, ``x_t = alpha(t) x_0 + sigma(t) eps``: the accuracy of a noise-aware classifier at
that noise level (Dhariwal & Nichol 2021). ``time: 0`` uses the clean held-out data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import ErrorBars, Level, Resamples, mean_with_interval

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

BATCH = 1024


class Accuracy(Metric):
    """Held-out accuracy of the run's classifier (``accuracy``, ``accuracy_low``, ...).

    Args:
        time: noise level the held-out examples are classified at (0: clean).
        resamples: bootstrap resamples for the interval (0: none).
        level: confidence level of the interval.
    """

    needs_samples = False

    def __init__(self, time: Annotated[float, Field(ge=0, le=1)] = 0.0,
                 resamples: Resamples = 1000, level: Level = 0.95) -> None:
        self.time = time
        self.bars = ErrorBars(resamples, level)

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor | None, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        if model is None or getattr(model.network, "prediction", None) != "logits":
            raise ValueError("the accuracy metric needs a classifier model (network kind: "
                             "classifier)")
        if data.heldout_labels is None:
            raise ValueError("the accuracy metric needs a data set with class labels")
        parameter = next(model.parameters())
        noise = torch.Generator().manual_seed(generator.initial_seed())
        correct = []
        for start in range(0, len(data.heldout), BATCH):
            x = data.heldout[start:start + BATCH].to(parameter.dtype)
            t = torch.full((len(x),), self.time, dtype=parameter.dtype)
            if self.time > 0:
                x, _ = model.process.marginal_sample(
                    x, t, torch.randn(x.shape, generator=noise, dtype=x.dtype))
            logits = model(x.to(parameter.device), t.to(parameter.device)).cpu()
            labels = data.heldout_labels[start:start + BATCH]
            correct.append((logits.argmax(dim=1) == labels).double())
        out = mean_with_interval("accuracy", torch.cat(correct), generator, self.bars)
        out.pop("accuracy_std")  # of 0/1 outcomes: sqrt(a (1 - a)), nothing new
        return out


__all__ = ["Accuracy"]

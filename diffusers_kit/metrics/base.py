"""Sample-quality metrics (kind ``metric``)."""

from __future__ import annotations

import torch

from diffusers_kit.data.base import DataSplits


class Metric:
    """Base class of metrics: ``evaluate(samples, data, generator) -> {name: value}``."""

    def evaluate(
        self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator
    ) -> dict[str, float]:
        raise NotImplementedError

"""Sample-quality metrics (kind ``metric``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.data.base import DataSplits

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


class Metric:
    """Base class of metrics: ``evaluate(samples, data, generator, model) -> {name: value}``.

    ``model`` is the trained :class:`ScoreModel` (with its sampling weights, the EMA when there
    is one), for metrics such as likelihoods that need it; sample-only metrics ignore it.

    ``needs_samples``: False for metrics of the model alone (a likelihood, a classifier's
    held-out accuracy); those also run for a spec that only trains, with ``samples=None``.

    ``uses_labels``: the metric judges class-conditional samples; the run passes the requested
    class of each sample as ``labels=`` (None when the samples were drawn without labels).
    """

    needs_samples: bool = True
    uses_labels: bool = False

    def evaluate(
        self,
        samples: torch.Tensor,
        data: DataSplits,
        generator: torch.Generator,
        model: ScoreModel | None = None,
    ) -> dict[str, float]:
        raise NotImplementedError

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

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        raise NotImplementedError


def metric_figures(metric: Metric, samples: torch.Tensor | None, data: DataSplits,
                   generator: torch.Generator, model: ScoreModel | None = None,
                   labels: torch.Tensor | None = None, model_data: DataSplits | None = None
                   ) -> dict[str, float]:
    """``metric`` evaluated the way every run does it: the samples' labels passed to a metric
    that ``uses_labels``; a metric of the model alone (``needs_samples`` False) given
    ``model_data`` — the data as the model sees it — when that differs from ``data``: for a
    latent diffusion model the encoded data, and its figures are then prefixed ``latent_``
    (a latent likelihood is not a pixel one; :mod:`diffusers_kit.latent`)."""
    from diffusers_kit.latent import LATENT_PREFIX

    extra = {"labels": labels} if metric.uses_labels else {}
    if metric.needs_samples or model_data is None or model_data is data:
        return metric.evaluate(samples, data, generator, model, **extra)
    values = metric.evaluate(samples, model_data, generator, model, **extra)
    if not isinstance(values, dict):
        return values  # the caller's output check names the mistake
    return {f"{LATENT_PREFIX}{key}": value for key, value in values.items()}

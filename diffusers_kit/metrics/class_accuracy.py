"""Class accuracy of samples, judged by a trained classifier (kind ``metric``,
``class_accuracy``).

For class-conditional samples (each drawn for a requested label ``y_i``): the fraction the
feature network classifies as requested, ``1/n sum_i 1[argmax_c p(c | x_i) = y_i]``, with a
per-class table (``class_accuracy_<c>``) and the percentile bootstrap interval of the mean. Its
floor is the same figure on real held-out examples with their true labels: the feature
network's held-out accuracy, what perfect samples would score.

Samples drawn without labels (an unconditional model) get the class balance instead: the total
variation distance between the predicted class frequencies of the samples and the held-out
labels' frequencies, ``class_tv = 1/2 sum_c |p_samples(c) - p_heldout(c)|`` (0: every class as
frequent as in the data; a model that drops a digit scores at least its share), beside its
real-vs-real floor with a bootstrap interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.features import FeatureMetric
from diffusers_kit.metrics.floor import (
    Level,
    Resamples,
    compare_with_floor,
    mean_with_interval,
    real_sets,
)
from diffusers_kit.references import TrainedModel

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def class_frequencies(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(labels.long(), minlength=classes).double() / max(len(labels), 1)


def total_variation(a: torch.Tensor, b: torch.Tensor, classes: int) -> float:
    """``1/2 sum_c |p_a(c) - p_b(c)|`` between the class frequencies of two label vectors."""
    return float(0.5 * (class_frequencies(a, classes) - class_frequencies(b, classes))
                 .abs().sum())


class ClassAccuracy(FeatureMetric):
    """Fraction of class-conditional samples classified as their requested label, per class
    and overall; for samples without labels, the class balance ``class_tv``.

    Args:
        features: the trained classifier that judges the samples.
        resamples: bootstrap resamples for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "class_accuracy"
    uses_labels = True

    def __init__(self, features: TrainedModel, resamples: Resamples = 1000,
                 level: Level = 0.95) -> None:
        super().__init__(features, resamples, level)

    def score(self, x: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator | None = None) -> dict[str, float]:
        """Accuracy of the feature network on ``x`` against ``labels``, overall (with its
        interval) and per class (``class_accuracy_<c>``, for each class present)."""
        self.space.check(x)
        generator = generator or torch.Generator().manual_seed(0)
        labels = labels.long().cpu().flatten()
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} samples")
        correct = (self.space.predict(x) == labels).double()
        out = mean_with_interval(self.name, correct, generator, self.bars)
        out.pop(f"{self.name}_std")
        for c in labels.unique().tolist():
            out[f"{self.name}_{c}"] = float(correct[labels == c].mean())
        return out

    def evaluate(
        self,
        samples: torch.Tensor,
        data: DataSplits,
        generator: torch.Generator,
        model: ScoreModel | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """With ``labels`` (the requested class of each sample): accuracy beside the held-out
        floor; without: the class balance ``class_tv`` beside its floor."""
        self.space.check(samples, data)
        if data.heldout_labels is None:
            raise ValueError("class_accuracy needs a data set with class labels")
        if labels is not None:
            out = self.score(samples, labels, generator)
            real = self.score(data.heldout, data.heldout_labels, generator)
            floor = {f"{self.name}_floor": real[self.name],
                     f"{self.name}_floor_low": real[f"{self.name}_low"],
                     f"{self.name}_floor_high": real[f"{self.name}_high"]}
            head = {k: out[k] for k in (self.name, f"{self.name}_low", f"{self.name}_high")}
            rest = {k: v for k, v in out.items() if k not in head}
            return {self.name: head[self.name], **floor, **head, **rest}
        sets = real_sets(samples, data, generator)
        classes = int(self.space.logits(sets.reference[:1]).shape[1])
        reference = data.heldout_labels[: sets.n].long()

        def statistic(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            return {"class_tv": total_variation(a, b, classes)}

        # the held-out side uses its true labels: the floor is the classifier's own confusion
        # plus the sampling noise of n draws
        return compare_with_floor("class_tv", statistic, sets, generator, self.bars,
                                  samples=self.space.predict(sets.samples), reference=reference,
                                  real=self.space.predict(sets.real), bounds={"class_tv": (0, 1)})


__all__ = ["ClassAccuracy", "class_frequencies", "total_variation"]

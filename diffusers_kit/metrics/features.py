"""The feature space of the distribution metrics: a classifier the project trains itself.

FID (Heusel et al. 2017) compares samples in the pool layer of an Inception network trained on
ImageNet; nothing can be downloaded here, and Inception knows nothing of 8x8 digits anyway. So
the metrics ``fd``, ``kid``, ``prdc`` and ``class_accuracy`` name a **trained model** (a spec such
as ``specs/features_digits.yaml``: the ``classifier`` network trained on clean data of the same
data set, built once and reused through the run pipeline) and compare samples in its
penultimate layer (:meth:`NoiseAwareClassifier.features`); its logits give class predictions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import ErrorBars, RealSets, real_sets
from diffusers_kit.references import TrainedModel
from diffusers_kit.spec.errors import SpecError, SpecIssue

if TYPE_CHECKING:
    from diffusers_kit.networks.base import Network

BATCH = 1024
# data sets whose value ranges differ by more than this were scaled differently
RANGE_TOLERANCE = 0.05


class FeatureSpace:
    """Features (penultimate layer) and class predictions of a trained classifier model."""

    def __init__(self, model: TrainedModel, metric: str = "metric") -> None:
        self.model = model
        self.metric = metric
        self._network: Network | None = None

    def problem(self, network: Network) -> str | None:
        if getattr(network, "prediction", None) != "logits" or not callable(
                getattr(network, "features", None)):
            return (f"a classifier model (network kind: classifier, objective classification); "
                    f"{self.model.ref.describe()} trains a {type(network).__name__}")
        return None

    def network(self) -> Network:
        """The classifier with its sampling (EMA) weights, in eval mode (loaded once)."""
        if self._network is None:
            network = self.model.network()
            if (reason := self.problem(network)) is not None:
                raise self.error(reason)
            self._network = network
        return self._network

    def error(self, expected: str) -> SpecError:
        """A spec error naming this metric's ``features`` field (raised at evaluation time,
        when the sets to compare are known)."""
        return SpecError([SpecIssue(("evaluate", "metrics", self.metric, "features"), expected,
                                    self.model.ref.to_config())])

    def check(self, x: torch.Tensor, data: DataSplits | None = None) -> None:
        """The examples must have the shape, and the data set the value range, that the feature
        network was trained on (a range mismatch means another ``scale``: silent nonsense)."""
        shape = tuple(self.network().data_shape)
        if tuple(x.shape[1:]) != shape:
            raise self.error(f"a feature network trained on examples of the shape evaluated "
                             f"here, {tuple(x.shape[1:])}; it was trained on {shape}")
        if data is None or (self.model._data is None and self.model.run_dir is None):
            return
        own = self.model.data().train
        theirs = data.train
        for name, a, b in (("minimum", own.min(), theirs.min()),
                           ("maximum", own.max(), theirs.max())):
            if abs(float(a) - float(b)) > RANGE_TOLERANCE * float(own.max() - own.min()):
                raise self.error(f"a feature network trained on data scaled like this run's "
                                 f"(the {name} of its training data is {float(a):.3g}, of this "
                                 f"run's {float(b):.3g}: another data scale?)")

    def value_range(self) -> tuple[float, float] | None:
        """The range of the feature network's training data (None when it is not known)."""
        if self.model._data is None and self.model.run_dir is None:
            return None
        own = self.model.data().train
        return float(own.min()), float(own.max())

    @torch.no_grad()
    def _apply(self, x: torch.Tensor, head: bool) -> torch.Tensor:
        """Examples are clamped to the training data's range first: a normalising network
        would see a sample at +-80 as a plausible image (and the metrics would call garbage
        perfect); clamped, it is judged as it looks (the picture clamps too)."""
        network = self.network()
        parameter = next(network.parameters())
        bounds = self.value_range()
        outputs = []
        for start in range(0, len(x), BATCH):
            chunk = x[start:start + BATCH].to(parameter.device, parameter.dtype)
            if bounds is not None:
                chunk = chunk.clamp(*bounds)
            t = torch.zeros(len(chunk), device=parameter.device, dtype=parameter.dtype)
            h = network.features(chunk, t)  # type: ignore[operator]
            outputs.append((network.head(h) if head else h).double().cpu())
        return torch.cat(outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, width)`` penultimate-layer features, float64 on the CPU."""
        return self._apply(x, head=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, classes)`` logits, float64 on the CPU."""
        return self._apply(x, head=True)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted class of each example."""
        return self.logits(x).argmax(dim=1)


class FeatureMetric(Metric):
    """A metric computed in a trained classifier's feature space, with bootstrap error bars.

    ``features`` is a model reference (a run folder, a spec file, or ``{spec:, overrides:}``);
    when it is already resolved (it is inside a run), it must be a classifier.
    """

    name = "feature"

    def __init__(self, features: TrainedModel, resamples: int, level: float) -> None:
        self.space = FeatureSpace(features, self.name)
        self.bars = ErrorBars(resamples, level)
        if features.resolved:
            network = features.network()
            if (reason := self.space.problem(network)) is not None:
                raise ValueError(f"features must name {reason}")

    def embedded_sets(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator
                      ) -> tuple[RealSets, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check the samples, draw the real sets (the floor's), and embed samples, held-out
        reference and real set in the feature space: ``(sets, fake, reference, real)``."""
        self.space.check(samples, data)
        sets = real_sets(samples, data, generator)
        fake, reference, real = (self.space.embed(x) for x in
                                 (sets.samples, sets.reference, sets.real))
        return sets, fake, reference, real


"""Classifier guidance (Dhariwal & Nichol 2021, alg. 1 and 2). Kind ``guidance``, name
``classifier``.

A noise-aware classifier ``p_phi(y | x_t, t)`` (the ``classifier`` network trained with the
``classification`` objective on noised inputs, by its own spec) supplies the likelihood term of
Bayes' rule, scaled by ``s``::

    score(x_t | y) = score(x_t) + s grad_x log p_phi(y | x_t, t)
    eps(x_t | y)   = eps(x_t) - s sigma(t) grad_x log p_phi(y | x_t, t)       (their eq. 14)

``s = 1`` samples the posterior ``p(x | y)`` when the classifier is exact; ``s > 1`` sharpens
it (``p(y | x)^s``, their sec. 4.1). The gradient is one backward pass through the classifier
only, never through the diffusion network; autograd is on for that pass alone.

The classifier is a trained model named like any other (a spec such as
``specs/classifier_digits.yaml``, or a run folder): the run pipeline trains it once and reuses
it. It must be trained under the same noise process as the model it guides (same ``alpha(t)``,
``sigma(t)``): :meth:`ClassifierGuidance.check` compares the two at a few times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.guidance.base import GradientGuidance, Interval
from diffusers_kit.references import TrainedModel
from diffusers_kit.solvers.base import model_device

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network

CHECK_TIMES = (0.05, 0.3, 0.6, 0.95)


class ClassifierGuidance(GradientGuidance):
    """``+ s grad_x log p_phi(y | x_t, t)`` from a trained noise-aware classifier.

    Args:
        classifier: the trained classifier (a spec file or a run folder); it must have been
            trained under the same noise process as the model it guides.
        scale: the guidance scale ``s`` (1: the posterior, for an exact classifier).
        interval: guide only for noise levels ``sigma/alpha`` in ``[lo, hi]``.
    """

    def __init__(self, classifier: TrainedModel,
                 scale: Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)] = 1.0,
                 interval: Interval | None = None) -> None:
        super().__init__(scale, interval)
        self.classifier = classifier
        self._network: Network | None = None
        self._checked = False

    def network(self, device: torch.device | None = None) -> Network:
        """The classifier network (sampling weights, eval mode), on ``device``."""
        if self._network is None:
            self._network = self.classifier.network()
        if device is not None and model_device(self._network) != device:
            self._network = self._network.to(device)
        return self._network

    def num_classes(self) -> int | None:
        if not self.classifier.resolved:
            return None
        network = self.network()
        return getattr(network, "num_labels", None)

    def check(self, model: ScoreModel) -> str | None:
        """The classifier is a classifier, trained under ``model``'s process. A reference not
        built yet (``dkit validate``; the run graph builds references before components) is
        checked on first use instead."""
        if not self.classifier.resolved:
            return None
        self._checked = True
        network = self.network()
        if getattr(network, "prediction", None) != "logits":
            return (f"a classifier model (network kind: classifier, objective classification); "
                    f"{self.classifier.ref.describe()} trains a {type(network).__name__}")
        own = self.classifier.diffusion().process
        times = torch.tensor(CHECK_TIMES, dtype=torch.float64)
        for mine, theirs in zip(model.process.marginal(times), own.marginal(times), strict=True):
            if not torch.allclose(mine.double(), theirs.double(), rtol=1e-4, atol=1e-6):
                return (f"a classifier trained under the same noise process as the model it "
                        f"guides ({self.classifier.ref.describe()} uses "
                        f"{type(own).__name__}, the model {type(model.process).__name__}, and "
                        f"their alpha(t), sigma(t) differ)")
        return None

    def gradient(self, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None) -> torch.Tensor:
        """``grad_x log p_phi(y | x_t, t)``: one backward pass through the classifier."""
        if y is None:
            raise ValueError("classifier guidance needs labels (sample.labels)")
        if not self._checked and (reason := self.check(model)) is not None:
            raise ValueError(f"classifier guidance needs {reason}")
        network = self.network(x.device)
        x = x.detach().requires_grad_(True)
        logits = network(x, t.to(x.dtype)).float()
        chosen = torch.log_softmax(logits, dim=-1).gather(1, y.long().reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, x)
        return grad


__all__ = ["ClassifierGuidance"]

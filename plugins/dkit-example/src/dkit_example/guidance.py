"""A guidance term from a third party: steer the mean brightness of the samples.

A guidance term is one class. This one is a *gradient* term (it subclasses
``diffusers_kit.GradientGuidance`` and implements ``gradient`` only): dkit adds
``scale * grad_x log p(y | x_t)`` to the model's score, converts it to whatever the network
predicts, and every registered solver samples with it.

The measurement is the mean pixel value ``m(x_0)``, asked to be ``target`` within ``tolerance``:
``p(target | x_0) = N(target; m(x_0), tolerance^2)``. At time ``t`` the term uses the plain
estimate ``x_0 ~ x_t / alpha`` (no network), whose mean carries extra noise of variance
``sigma^2 / (alpha^2 d)`` over ``d`` pixels, so

    log p(target | x_t) ~ -(m(x_t) / alpha - target)^2 / (2 v)
    v                   = tolerance^2 + sigma^2 / (alpha^2 d)
    grad_x log p        = -(m(x_t) / alpha - target) / (v alpha d)   (the same for every pixel)

It fades out by itself at high noise (``v`` grows) and is exact for the last steps. It needs no
labels, so it says so (``needs_labels = False``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from diffusers_kit import GradientGuidance


class Brightness(GradientGuidance):
    """Pull the samples' mean pixel value towards ``target`` (a Gaussian measurement).

    Args:
        target: the mean pixel value to reach (data scale: -1 black, 1 white for [-1, 1] data).
        tolerance: standard deviation of the measurement (smaller pulls harder).
        scale: guidance scale (1: the measurement's likelihood as it is).
        interval: guide only for noise levels sigma/alpha in [lo, hi].
    """

    needs_labels = False

    def __init__(
        self,
        target: Annotated[float, Field(ge=-10, le=10)] = 0.0,
        tolerance: Annotated[float, Field(gt=0, le=10)] = 0.05,
        scale: Annotated[float, Field(ge=0, le=100)] = 1.0,
        interval: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(scale, interval)
        self.target, self.tolerance = target, tolerance

    def gradient(self, model, x, t, y):  # type: ignore[no-untyped-def]
        alpha, sigma = model.process.marginal(t.to(x.dtype))
        d = x[0].numel()
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
        mean = x.flatten(1).mean(1).reshape(shape)
        variance = self.tolerance**2 + sigma**2 / (alpha**2 * d)
        return (-(mean / alpha - self.target) / (variance * alpha * d)).expand_as(x)


__all__ = ["Brightness"]

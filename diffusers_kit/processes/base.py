"""The math layer shared by every Gaussian noise process.

One view of every process (DESIGN.md, "the math layer")::

    x_t = alpha(t) * x_0 + sigma(t) * eps,    eps ~ N(0, I),    t in [0, 1]

A concrete process states its marginal coefficients ``alpha(t)`` and ``sigma(t)``, its forward
SDE ``dx = f(x, t) dt + g(t) dw`` and its prior. Everything else here is derived from those once:
the marginal sampler, the signal-to-noise ratio, the reverse-time SDE drift and the
probability-flow ODE drift (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
eqs. 6 and 13), and the conversions between network parameterisations.

All functions take ``t`` as a tensor of shape ``(B,)`` (one time per sample) and broadcast
coefficients over the data dimensions with :func:`expand`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

PREDICTIONS = ("eps", "score", "x0", "v")


def expand(coefficient: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return coefficient.reshape(coefficient.shape + (1,) * (like.dim() - coefficient.dim()))


class NoiseProcess:
    """Base class of noise processes: ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`drift`, :meth:`diffusion` and the
    prior (:meth:`prior_std`, or override :meth:`prior_sample` / :meth:`prior_log_prob`).
    ``t_min`` is the smallest time samplers integrate to (a positive value avoids the
    singular score at ``t = 0``).
    """

    t_min: float = 0.0

    # -- marginal -----------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` of ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)``."""
        return self.alpha(t), self.sigma(t)

    def marginal_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``x_t ~ q(x_t | x_0)``; returns ``(x_t, eps)``."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.marginal(t)
        return expand(alpha, x0) * x0 + expand(sigma, x0) * noise, noise

    def log_snr(self, t: Tensor) -> Tensor:
        """``log SNR(t) = log(alpha(t)^2 / sigma(t)^2)`` (Kingma et al. 2021)."""
        alpha, sigma = self.marginal(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    # -- forward SDE ----------------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Forward SDE drift ``f(x, t)``."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """Forward SDE diffusion coefficient ``g(t)`` (shape ``(B,)``)."""
        raise NotImplementedError

    # -- prior ------------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``p(x_1) = N(0, s^2 I)``."""
        raise NotImplementedError

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``x_1 ~ p(x_1)``."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std() * noise

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """``log p(x_1)`` per sample (sum over data dimensions)."""
        std = self.prior_std()
        d = x[0].numel()
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))

    # -- reverse time (derived once) ------------------------------------------------------------
    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Reverse-time SDE drift ``f(x, t) - g(t)^2 * score`` (Song et al. 2021, eq. 6)."""
        g = expand(self.diffusion(t), x)
        return self.drift(x, t) - g * g * score

    def probability_flow_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift ``f(x, t) - g(t)^2 * score / 2`` (Song et al. 2021, eq. 13)."""
        g = expand(self.diffusion(t), x)
        return self.drift(x, t) - 0.5 * g * g * score

    # -- parameterisations ----------------------------------------------------------------------
    def convert(self, output: Tensor, x_t: Tensor, t: Tensor, source: str, target: str) -> Tensor:
        """Convert a network output between parameterisations of the same ``x_t``.

        With ``x_t = a x_0 + s eps``: ``score = -eps / s``, ``x0 = (x_t - s eps) / a`` and
        ``v = a eps - s x_0`` (Salimans & Ho 2022). Conversion goes through ``eps``.
        """
        if source == target:
            return output
        alpha, sigma = (expand(c, x_t) for c in self.marginal(t))
        if source == "eps":
            eps = output
        elif source == "score":
            eps = -sigma * output
        elif source == "x0":
            eps = (x_t - alpha * output) / sigma
        elif source == "v":
            eps = (sigma * x_t + alpha * output) / (alpha * alpha + sigma * sigma)
        else:
            raise ValueError(f"unknown prediction {source!r}; expected one of {PREDICTIONS}")
        if target == "eps":
            return eps
        if target == "score":
            return -eps / sigma
        if target == "x0":
            return (x_t - sigma * eps) / alpha
        if target == "v":
            x0 = (x_t - sigma * eps) / alpha
            return alpha * eps - sigma * x0
        raise ValueError(f"unknown prediction {target!r}; expected one of {PREDICTIONS}")

    def time_grid(self, steps: int, *, device: torch.device | str | None = None) -> Tensor:
        """``steps + 1`` decreasing times from 1 to ``t_min`` (the default sampling grid)."""
        return torch.linspace(1.0, self.t_min, steps + 1, device=device, dtype=torch.float64)

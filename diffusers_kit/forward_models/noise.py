"""Measurement noise models: ``y ~ p(y | a)`` given the clean measurement ``a = A(x)``.

A forward model holds one (``operator.noise``); ``simulate`` draws from it and the
likelihood-based methods (DPS) differentiate its log-likelihood, so the noise that measures is
the noise that restores. Each model gives its sampling, its exact log-likelihood (summed over
the measured values, one number per sample), the conditional mean and variance of ``y`` and a
Gaussian log-likelihood widened by an extra variance (DPS's ``r_t^2``).

- :class:`GaussianNoise`: ``y = a + sigma_y n``, ``n ~ N(0, I)`` (``sigma_y`` in data units);
- :class:`PoissonNoise`: shot noise of ``photons`` expected counts at the top of the data
  range ``[low, high]`` (``[-1, 1]`` for dkit's images): the intensity ``u = (a - low) /
  (high - low)`` (clamped at 0) is counted, ``k ~ Poisson(photons u)``, and reported in data
  units, ``y = low + (high - low) k / photons``; so ``E[y] = a`` and ``Var[y] =
  (high - low)^2 u / photons`` for ``a >= low``: the convention of DPS's Poisson
  experiments (Chung et al. 2023, sec. 4; their ``rate`` is ``photons / 255``) without their
  reference code's clipping of ``u`` at 1 and of ``y`` to the data range, which would bias
  ``E[y]`` and break the likelihood below;
- :class:`PoissonGaussianNoise`: the Poisson measurement plus Gaussian read noise ``sigma_y n``
  (Foi et al. 2008), whose exact likelihood is the Poisson mixture of Gaussians
  ``sum_k Poisson(k; photons u) N(y; low + (high - low) k / photons, sigma_y^2)``.
"""

from __future__ import annotations

import math

import torch

from diffusers_kit.hookspecs import OptionError

LOG_2PI = math.log(2 * math.pi)


class NoiseModel:
    """Base class: ``y ~ p(y | a)`` elementwise, ``a`` and ``y`` of shape
    ``(B, *measurement_shape)``.

    ``gaussian`` says whether ``p(y | a) = N(y; a, sigma_y^2 I)`` exactly (the methods whose
    formulas assume it, replacement and ΠGDM, refuse other noise); ``sigma_y`` is the standard
    deviation of its Gaussian part (0 for none).
    """

    gaussian: bool = False
    sigma_y: float = 0.0

    def sample(self, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``y`` given ``a`` (``generator`` on ``a``'s device)."""
        raise NotImplementedError

    def log_likelihood(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``log p(y | a)`` summed over the measured values: shape ``(B,)``."""
        raise NotImplementedError

    def mean(self, a: torch.Tensor) -> torch.Tensor:
        """``E[y | a]``."""
        raise NotImplementedError

    def variance(self, a: torch.Tensor) -> torch.Tensor:
        """``Var[y | a]`` elementwise."""
        raise NotImplementedError

    def widened_log_likelihood(self, y: torch.Tensor, a: torch.Tensor,
                               extra_variance: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``log N(y; a, (v + extra_variance) I)`` up to a constant in ``a``, shape ``(B,)``,
        with ``v`` the noise variance at the measurement: ``Var[y | a = y]`` (for Poisson
        noise the weighting ``1 / y`` of Chung et al. 2023, eq. 17), floored at one count's
        variance so that a zero count keeps a finite weight. ``extra_variance`` is per sample
        (``(B,)``) or a number. Exact for Gaussian noise (``v = sigma_y^2``)."""
        v = self.variance(y.detach()).clamp_min(self.floor()).flatten(1)
        extra = torch.as_tensor(extra_variance, dtype=a.dtype, device=a.device)
        if extra.dim() == 1:
            extra = extra[:, None]
        total = (v + extra).clamp_min(1e-12)
        return -0.5 * ((y - a).flatten(1).pow(2) / total + total.log()).sum(1)

    def floor(self) -> float:
        """Smallest variance :meth:`widened_log_likelihood` uses."""
        return 0.0

    def describe(self) -> str:
        raise NotImplementedError


class GaussianNoise(NoiseModel):
    """``y = a + sigma_y n``, ``n ~ N(0, I)`` (``sigma_y = 0``: noiseless)."""

    gaussian = True

    def __init__(self, sigma_y: float = 0.0) -> None:
        sigma_y = float(sigma_y)
        if not (math.isfinite(sigma_y) and sigma_y >= 0):
            raise OptionError("sigma_y", "a finite standard deviation >= 0 (data units)",
                              sigma_y)
        self.sigma_y = sigma_y

    def sample(self, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.sigma_y == 0:
            return a
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        return a + self.sigma_y * noise

    def log_likelihood(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.sigma_y == 0:
            raise ValueError("a noiseless measurement has no density: sigma_y is 0")
        z = ((y - a) / self.sigma_y).flatten(1)
        return -0.5 * (z.pow(2) + LOG_2PI).sum(1) - z.shape[1] * math.log(self.sigma_y)

    def mean(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def variance(self, a: torch.Tensor) -> torch.Tensor:
        return torch.full_like(a, self.sigma_y**2)

    def describe(self) -> str:
        return f"sigma_y = {self.sigma_y:g}"


class PoissonNoise(NoiseModel):
    """Shot noise: ``y = low + (high - low) k / photons``, ``k ~ Poisson(photons u)``,
    ``u = max(0, (a - low) / (high - low))`` (see the module doc)."""

    def __init__(self, photons: float, low: float = -1.0, high: float = 1.0) -> None:
        photons = float(photons)
        if not (math.isfinite(photons) and photons > 0):
            raise OptionError("photons", "a positive expected count", photons)
        if not high > low:
            raise ValueError(f"the data range [{low}, {high}] must have high > low")
        self.photons, self.low, self.high = photons, float(low), float(high)

    @property
    def scale(self) -> float:
        return self.high - self.low

    def rate(self, a: torch.Tensor) -> torch.Tensor:
        """The expected count ``photons u``."""
        return self.photons * ((a - self.low) / self.scale).clamp_min(0)

    def counts(self, y: torch.Tensor) -> torch.Tensor:
        """The count ``k`` a measurement ``y`` reports."""
        return (y - self.low) * self.photons / self.scale

    def sample(self, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.poisson(self.rate(a).detach(), generator=generator)
        return self.low + self.scale * k / self.photons

    def log_likelihood(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The log-probability of the counts ``k`` that ``y`` reports (a probability mass:
        ``y`` takes discrete values)."""
        k = self.counts(y).round()
        rate = self.rate(a)
        log = torch.special.xlogy(k, rate) - rate - torch.lgamma(k + 1)
        return log.flatten(1).sum(1)

    def mean(self, a: torch.Tensor) -> torch.Tensor:
        return self.low + self.scale * self.rate(a) / self.photons

    def variance(self, a: torch.Tensor) -> torch.Tensor:
        return self.scale**2 * self.rate(a) / self.photons**2

    def floor(self) -> float:
        return (self.scale / self.photons) ** 2  # one count's variance

    def describe(self) -> str:
        return f"Poisson noise of {self.photons:g} photons over [{self.low:g}, {self.high:g}]"


class PoissonGaussianNoise(PoissonNoise):
    """The Poisson measurement plus Gaussian read noise ``sigma_y n`` (see the module doc)."""

    def __init__(self, photons: float, sigma_y: float, low: float = -1.0,
                 high: float = 1.0) -> None:
        super().__init__(photons, low, high)
        self.read = GaussianNoise(sigma_y)
        self.sigma_y = self.read.sigma_y

    def sample(self, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.read.sample(super().sample(a, generator), generator)

    def log_likelihood(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The Poisson mixture summed over the counts ``k`` within 12 standard deviations of
        the largest rate (the terms beyond weigh less than ``1e-30``)."""
        if self.sigma_y == 0:
            return super().log_likelihood(y, a)
        rate = self.rate(a)
        top = float(rate.detach().max()) if rate.numel() else 0.0
        ks = torch.arange(0, math.ceil(top + 12 * math.sqrt(top) + 12) + 1, device=a.device,
                          dtype=a.dtype)
        rate, yv = rate[..., None], y[..., None]
        log_poisson = torch.special.xlogy(ks, rate) - rate - torch.lgamma(ks + 1)
        level = self.low + self.scale * ks / self.photons
        log_normal = (-0.5 * ((yv - level) / self.sigma_y) ** 2 - 0.5 * LOG_2PI
                      - math.log(self.sigma_y))
        return torch.logsumexp(log_poisson + log_normal, dim=-1).flatten(1).sum(1)

    def variance(self, a: torch.Tensor) -> torch.Tensor:
        return super().variance(a) + self.sigma_y**2

    def floor(self) -> float:
        return super().floor() + self.sigma_y**2

    def describe(self) -> str:
        return f"{super().describe()} and Gaussian read noise sigma_y = {self.sigma_y:g}"


def noise_model(noise: str, sigma_y: float, photons: float | None) -> NoiseModel:
    """The noise model a spec names: ``gaussian`` (``sigma_y``), ``poisson`` (``photons``) or
    ``poisson_gaussian`` (both)."""
    if noise == "gaussian":
        return GaussianNoise(sigma_y)
    if photons is None:
        raise ValueError(f"photons: {noise} noise needs the expected photon count")
    if noise == "poisson":
        if sigma_y:
            raise ValueError("sigma_y: poisson noise has no Gaussian part (use "
                             "noise: poisson_gaussian for read noise)")
        return PoissonNoise(photons)
    if noise == "poisson_gaussian":
        return PoissonGaussianNoise(photons, sigma_y)
    raise ValueError(f"noise: expected gaussian, poisson or poisson_gaussian, given {noise!r}")


__all__ = ["GaussianNoise", "NoiseModel", "PoissonGaussianNoise", "PoissonNoise",
           "noise_model"]

"""Variance-preserving processes: the VP SDE (Song et al. 2021) and the family it heads.

Every process here has ``sigma(t)^2 = 1 - alpha(t)^2`` and is driven by the SDE::

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,        log alpha(t) = -1/2 int_0^t beta(u) du

so a member only states ``beta(t)`` and its integral (:meth:`VariancePreserving.log_alpha`);
the marginal, transition, drift and diffusion follow here, once. DDPM, the constant-sigma
chain and the Ornstein-Uhlenbeck process are members; the sub-VP SDE shares the drift but not
the variance.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.processes.base import NoiseProcess, Tensor, expand


class VariancePreserving(NoiseProcess):
    """Base of variance-preserving processes: ``x_t = alpha x_0 + sqrt(1 - alpha^2) eps``.

    Subclasses implement :meth:`log_alpha` (``-1/2 int_0^t beta``) and :meth:`beta`.
    The prior is ``N(0, I)``.
    """

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log alpha(t) = -1/2 int_0^t beta(u) du``."""
        raise NotImplementedError

    def beta(self, t: Tensor) -> Tensor:
        """The noise rate ``beta(t) = -2 d log alpha / dt``."""
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_of_log_alpha(self.log_alpha(t))

    def sigma_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        """``sigma = sqrt(1 - alpha^2)``, through expm1: exact near t = 0 where alpha ~ 1."""
        return torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_alpha = self.log_alpha(t)  # evaluated once for both coefficients
        return torch.exp(log_alpha), self.sigma_of_log_alpha(log_alpha)

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return 2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))

    def transition_coefficients(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``a = alpha(t) / alpha(s)``, ``b^2 = 1 - a^2`` (the variance stays preserved)."""
        log_a = self.log_alpha(t) - self.log_alpha(s)
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2.0 * log_a))

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * expand(self.beta(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def prior_std(self) -> float:
        return 1.0


class VP(VariancePreserving):
    """Variance-preserving SDE with a linear noise rate (Song et al. 2021, eq. 11).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, so
    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``. It is the continuous
    limit of DDPM with ``beta_i = beta(i / T) / T`` as T grows.

    Args:
        beta_min: noise rate at t = 0.
        beta_max: noise rate at t = 1 (with the default 0.1 / 20, alpha(1)^2 = 4.5e-5).
    """

    t_min = 1e-3  # Song et al. 2021 stop sampling at t = 1e-3
    #: The ODE solvers' ``spacing: auto``: the quadratic grid in ``t``, as for DDPM (its
    #: discrete twin); for sub-VP too, whose log-SNR spans 28 nats (``docs/solvers.md``).
    default_spacing = "quadratic"

    def __init__(
        self,
        beta_min: Annotated[float, Field(ge=0, le=1000)] = 0.1,
        beta_max: Annotated[float, Field(gt=0, le=1000)] = 20.0,
    ) -> None:
        if beta_max < beta_min:
            raise ValueError(f"beta_max ({beta_max}) must be at least beta_min ({beta_min})")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


class SubVP(VP):
    """Sub-VP SDE (Song et al. 2021, eq. 12): the VP drift with a smaller diffusion::

        dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw
        alpha(t) as for VP,   sigma(t) = 1 - alpha(t)^2   (not its square root)

    so its variance ``sigma^2 = (1 - alpha^2)^2`` stays below the VP one at every t.

    Args:
        beta_min: noise rate at t = 0.
        beta_max: noise rate at t = 1.
    """

    def sigma_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return -torch.expm1(2.0 * log_alpha)  # 1 - alpha^2

    def log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha(t)
        return 2.0 * log_alpha - 2.0 * torch.log(-torch.expm1(2.0 * log_alpha))

    def transition_coefficients(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        # sub-VP does not preserve variance: use the general linear-SDE transition
        return NoiseProcess.transition_coefficients(self, t, s)

    def diffusion(self, t: Tensor) -> Tensor:
        # exp(-2 int_0^t beta) = alpha(t)^4
        return torch.sqrt(self.beta(t) * -torch.expm1(4.0 * self.log_alpha(t)))

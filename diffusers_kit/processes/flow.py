"""Flow matching: paths that end in pure noise, ``alpha(1) = 0`` exactly.

Rectified flow (Liu, Gong & Liu 2022) and flow matching with the optimal-transport path
(Lipman et al. 2022, eq. 20) interpolate data and noise along a straight line::

    x_t = (1 - t) x_0 + t eps        (alpha = 1 - t,  sigma = t)

and train a network on the path's velocity ``u = d x_t / dt = eps - x_0`` (Lipman et al. 2022,
eq. 23; :meth:`NoiseProcess.convert`'s ``velocity``). The ``cosine`` path
``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (the trigonometric interpolant of Albergo &
Vanden-Eijnden 2023; Nichol & Dhariwal's cosine schedule without offset) is variance-preserving
and reaches pure noise too.

Both are Gaussian processes of the common view, so the rest of the math layer applies:

* the SDE with these marginals (Kingma et al. 2021, eq. 3 and following) has
  ``f(t) = alpha' / alpha`` and ``g(t)^2 = 2 sigma (alpha sigma' - sigma alpha') / alpha``:
  for the line ``f = -1 / (1 - t)``, ``g^2 = 2 t / (1 - t)``; for the cosine path
  ``f = -(pi / 2) tan(pi t / 2)``, ``g^2 = pi tan(pi t / 2)`` (VP with ``beta = pi tan(pi t /
  2)``). Both are infinite at ``t = 1``, where the marginal is the prior ``N(0, I)`` whatever
  ``x_0``; :meth:`marginal_rates` states ``(alpha', sigma')``, finite everywhere;
* the probability flow ``dx / dt = E[u | x_t]`` is what the ODE solvers integrate in their data
  form, from ``t = 1`` (docs/recipes.md).

``velocity`` and DDPM's ``v = alpha eps - sigma x_0`` are different targets: at fixed ``x_t``,
``u = (alpha alpha' + sigma sigma') / (alpha^2 + sigma^2) x_t + (alpha sigma' - sigma alpha') /
(alpha^2 + sigma^2) v``; on the line ``u = ((2 t - 1) x_t + v) / ((1 - t)^2 + t^2)``, on the
cosine path ``u = (pi / 2) v``.

The time shift of Stable Diffusion 3 (Esser et al. 2024, "Resolution-dependent shifting of
timestep schedules", with ``s = sqrt(m / n)``; diffusers' ``FlowMatchEulerDiscreteScheduler``
``shift``) maps a time ``u`` to::

    t = S(u) = s u / (1 + (s - 1) u),      u = S^-1(t) = t / (s - (s - 1) t)

which fixes 0 and 1 and, for ``s > 1``, moves every other time towards the noise
(:func:`shift_time`). It does not change the path: it is a process's choice of where to
evaluate, which the samplers' ``shifted`` spacing applies (:mod:`diffusers_kit.solvers.grids`).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.processes.base import NoiseProcess, Tensor, expand

HALF_PI = 0.5 * math.pi


def shift_time(u: Tensor, shift: float) -> Tensor:
    """``S(u) = s u / (1 + (s - 1) u)``, SD3's time shift (Esser et al. 2024; module doc)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(t: Tensor, shift: float) -> Tensor:
    """``S^-1(t) = t / (s - (s - 1) t)``, the inverse of :func:`shift_time`."""
    return t / (shift - (shift - 1.0) * t)


class Flow(NoiseProcess):
    """A path from data (``t = 0``) to pure noise (``t = 1``): ``linear`` (rectified flow,
    ``alpha = 1 - t``, ``sigma = t``) or ``cosine`` (``alpha = cos(pi t / 2)``,
    ``sigma = sin(pi t / 2)``). The prior is ``N(0, I)`` exactly: ``x_1 = eps``.

    Args:
        path: ``linear`` (Liu et al. 2022; Lipman et al. 2022) or ``cosine``.
        t_min: the last time samplers evaluate the network at before landing on t = 0.
        shift: the time shift ``s`` of the samplers' ``shifted`` spacing (SD3's, module doc;
            1: none). It does not change the path.
    """

    #: The ODE solvers' ``spacing: auto``: quadratic in ``t``, dense near the data, where
    #: ``log(alpha / sigma)`` runs off (the log-SNR grids cannot space ``-inf`` at ``t = 1``).
    default_spacing = "quadratic"

    def __init__(
        self,
        path: Literal["linear", "cosine"] = "linear",
        t_min: Annotated[float, Field(gt=0, lt=0.5)] = 1e-3,
        shift: Annotated[float, Field(gt=0, le=1000)] = 1.0,
    ) -> None:
        if path not in ("linear", "cosine"):
            raise ValueError(f"unknown path {path!r}; expected 'linear' or 'cosine'")
        self.path = path
        self.t_min = float(t_min)
        self.shift = float(shift)

    def __repr__(self) -> str:
        extra = f", shift={self.shift}" if self.shift != 1.0 else ""
        return f"{type(self).__name__}(path={self.path!r}, t_min={self.t_min}{extra})"

    def alpha(self, t: Tensor) -> Tensor:
        if self.path == "linear":
            return 1.0 - t
        return torch.sin(HALF_PI * (1.0 - t))  # = cos(pi t / 2), exactly 0 at t = 1

    def sigma(self, t: Tensor) -> Tensor:
        if self.path == "linear":
            return t
        return torch.sin(HALF_PI * t)

    def marginal_rates(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha', sigma')``: ``(-1, 1)`` on the line, ``(-(pi / 2) sigma, (pi / 2) alpha)``
        on the cosine path."""
        if self.path == "linear":
            return -torch.ones_like(t), torch.ones_like(t)
        return -HALF_PI * self.sigma(t), HALF_PI * self.alpha(t)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(t) x`` with ``f = alpha' / alpha`` (infinite at ``t = 1``)."""
        d_alpha, _ = self.marginal_rates(t)
        return expand(d_alpha / self.alpha(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """``g = sqrt(2 sigma (alpha sigma' - sigma alpha') / alpha)``."""
        alpha, sigma = self.marginal(t)
        d_alpha, d_sigma = self.marginal_rates(t)
        return (2.0 * sigma * (alpha * d_sigma - sigma * d_alpha) / alpha).sqrt()

    def prior_std(self) -> float:
        return 1.0

"""Denoising score matching (Vincent 2011; Song & Ermon 2019, eqs. 5-6; Song et al. 2021, eq. 7).

For ``x_t = alpha(t) x_0 + sigma(t) eps`` the conditional score is
``grad log q(x_t | x_0) = -eps / sigma(t)``, so the per-example loss is::

    l(theta; t) = 1/2 * lambda(t) * || s_theta(x_t, t) + eps / sigma(t) ||^2

averaged over the data and over times. Choices of ``lambda``:

* ``sigma2``: ``lambda = sigma(t)^2`` (NCSN) makes every level contribute comparably,
  ``1/2 || sigma s_theta + eps ||^2``; for an eps-predicting network this is exactly
  ``1/2 || eps_theta - eps ||^2``, i.e. half of DDPM's L_simple summed over dimensions;
* ``none``: ``lambda = 1``;
* ``likelihood``: ``lambda = g(t)^2``, the diffusion coefficient squared, for which the
  time-integrated loss bounds the negative log-likelihood (Song, Durkan, Murray & Ermon 2021,
  "Maximum Likelihood Training of Score-Based Diffusion Models", Theorem 1).

Times are drawn from the process's discrete levels (a VE ladder, or DDPM's steps i / T),
uniformly in ``[t_min, 1]`` (continuous time), or fixed at one ``time`` (denoising score
matching at the single noise level ``sigma(time)``, Vincent 2011).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import Objective
from diffusers_kit.processes.base import NoiseProcess, expand

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def sample_times(
    process: NoiseProcess,
    n: int,
    mode: str,
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times: uniform over the process's discrete levels (a noise ladder, or the steps
    ``i / T`` of a discrete chain), or uniform in ``[t_min, 1]``."""
    if mode == "levels":
        level_times = getattr(process, "level_times", None)
        if level_times is not None:
            grid = level_times(device=device).float()
            index = torch.randint(0, len(grid), (n,), device=device, generator=generator)
            return grid[index]
        if process.num_steps is not None:
            return step_times(process, n, device=device, generator=generator)
    u = torch.rand(n, device=device, generator=generator)
    return process.t_min + (1.0 - process.t_min) * u


def step_times(
    process: NoiseProcess,
    n: int,
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``t = i / T`` with ``i`` uniform on ``{1, ..., T}`` (Ho et al. 2020, Algorithm 1)."""
    steps = process.num_steps
    assert steps is not None
    index = torch.randint(1, steps + 1, (n,), device=device, generator=generator)
    return index.float() / steps


class DenoisingScoreMatching(Objective):
    """Denoising score matching over noise levels with weighting lambda(t).

    Args:
        weighting: ``sigma2`` for lambda = sigma(t)^2 (NCSN), ``none`` for lambda = 1,
            ``likelihood`` for lambda = g(t)^2 (the likelihood weighting of Song et al. 2021).
        times: ``levels`` samples the process's discrete noise levels when it has some (NCSN's
            ladder, DDPM's steps); ``uniform`` samples t uniformly in [t_min, 1] (score SDEs).
        time: train at this one time only: denoising score matching at the single noise level
            sigma(time) (Vincent 2011). Overrides ``times``.
    """

    ddp_ready = True  # one forward through the model, one ordinary backward

    def __init__(
        self,
        weighting: Literal["sigma2", "none", "likelihood"] = "sigma2",
        times: Literal["levels", "uniform"] = "levels",
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
    ) -> None:
        self.weighting = weighting
        self.times = times
        self.time = time

    def sample_times(self, process: NoiseProcess, n: int, device: torch.device,
                     generator: torch.Generator | None) -> torch.Tensor:
        if self.time is not None:
            return torch.full((n,), float(self.time), device=device)
        return sample_times(process, n, self.times, device=device, generator=generator)

    def loss(self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        t = self.sample_times(model.process, x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.per_example(model, x0, t, noise, labels).mean()

    def per_example(
        self,
        model: ScoreModel,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``1/2 lambda(t) || s_theta(x_t, t) + eps / sigma(t) ||^2`` per example, ``(B,)``."""
        process = model.process
        x_t, _ = process.marginal_sample(x0, t, noise)
        sigma = expand(process.sigma(t), x0)
        score = model.score(x_t, t, labels)
        residual = sigma * score + noise  # sigma * (s + eps / sigma)
        half_sq = 0.5 * residual.flatten(1).pow(2).sum(1)
        if self.weighting == "sigma2":
            return half_sq
        sigma2 = process.sigma(t).pow(2)
        if self.weighting == "none":
            return half_sq / sigma2
        return half_sq * process.diffusion(t).pow(2) / sigma2

"""Denoising score matching over noise levels (Vincent 2011; Song & Ermon 2019, eq. 5-6).

For ``x_t = alpha(t) x_0 + sigma(t) eps`` the conditional score is
``grad log q(x_t | x_0) = -eps / sigma(t)``, so the per-example loss is::

    l(theta; t) = 1/2 * lambda(t) * || s_theta(x_t, t) + eps / sigma(t) ||^2

averaged over the data and over noise levels. NCSN's weighting ``lambda(sigma) = sigma^2`` makes
every level contribute comparably: ``1/2 || sigma s_theta + eps ||^2`` (for an eps-predicting
network this is exactly ``1/2 || eps_theta - eps ||^2``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

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
    """Training times: uniform over the process's discrete levels, or uniform in [t_min, 1]."""
    level_times = getattr(process, "level_times", None)
    if mode == "levels" and level_times is not None:
        grid = level_times(device=device).float()
        index = torch.randint(0, len(grid), (n,), device=device, generator=generator)
        return grid[index]
    u = torch.rand(n, device=device, generator=generator)
    return process.t_min + (1.0 - process.t_min) * u


class DenoisingScoreMatching(Objective):
    """Denoising score matching over noise levels with weighting lambda(sigma).

    Args:
        weighting: ``sigma2`` for lambda = sigma(t)^2 (NCSN), ``none`` for lambda = 1.
        times: ``levels`` samples the process's discrete noise ladder when it has one (NCSN);
            ``uniform`` samples t uniformly in [t_min, 1] (continuous-time score SDEs).
    """

    def __init__(
        self,
        weighting: Literal["sigma2", "none"] = "sigma2",
        times: Literal["levels", "uniform"] = "levels",
    ) -> None:
        self.weighting = weighting
        self.times = times

    def loss(
        self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        process = model.process
        t = sample_times(process, x0.shape[0], self.times, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t, _ = process.marginal_sample(x0, t, noise)
        sigma = expand(process.sigma(t), x0)
        score = model.score(x_t, t)
        if self.weighting == "sigma2":
            residual = sigma * score + noise  # sigma * (s + eps / sigma)
        else:
            residual = score + noise / sigma
        return 0.5 * residual.flatten(1).pow(2).sum(1).mean()

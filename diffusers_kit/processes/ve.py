"""Variance-exploding (VE) SDE; the NCSN geometric noise ladder is its discretisation.

Song & Ermon 2019 ("Generative Modeling by Estimating Gradients of the Data Distribution") use
noise levels ``sigma_1 > ... > sigma_L`` in geometric progression. Song et al. 2021 take the
continuous limit ``sigma(t) = sigma_min * (sigma_max / sigma_min)^t``, ``t in [0, 1]``::

    x_t = x_0 + sigma(t) eps                       (alpha(t) = 1)
    dx  = sqrt(d sigma^2 / dt) dw,   g(t) = sigma(t) * sqrt(2 log(sigma_max / sigma_min))
    p(x_1) = N(0, sigma_max^2 I)

The ladder level ``i = 1..L`` sits at ``t_i = (L - i) / (L - 1)``: equal steps in ``t`` are equal
ratios ``sigma_i / sigma_{i+1}`` in noise level.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.processes.base import NoiseProcess, Tensor


class VE(NoiseProcess):
    """Variance-exploding SDE with a geometric noise ladder (NCSN; Song & Ermon 2019).

    Args:
        sigma_min: smallest noise level sigma_L (at t = 0).
        sigma_max: largest noise level sigma_1 (at t = 1); NCSN picks it about as large as the
            largest distance between two training points.
        num_levels: number of levels L of the discrete ladder (used by annealed Langevin
            dynamics and by discrete-level training).
    """

    def __init__(
        self,
        sigma_min: Annotated[float, Field(gt=0, le=1e6)] = 0.01,
        sigma_max: Annotated[float, Field(gt=0, le=1e6)] = 50.0,
        num_levels: Annotated[int, Field(ge=2, le=100_000)] = 10,
    ) -> None:
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max ({sigma_max}) must exceed sigma_min ({sigma_min})")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.num_levels = int(num_levels)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self) -> str:
        return (
            f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"num_levels={self.num_levels})"
        )

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

    def prior_std(self) -> float:
        return self.sigma_max

    def level_times(self, *, device: torch.device | str | None = None) -> Tensor:
        """Times ``t_1 > ... > t_L`` of the ladder (``t_1 = 1``, ``t_L = 0``)."""
        return torch.linspace(1.0, 0.0, self.num_levels, device=device, dtype=torch.float64)

    def levels(self, *, device: torch.device | str | None = None) -> Tensor:
        """The geometric ladder ``sigma_1 > ... > sigma_L``."""
        return self.sigma(self.level_times(device=device))

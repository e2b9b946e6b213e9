"""The Ornstein-Uhlenbeck "DDPM SDE" (McAllester, TTIC 31230 notes on diffusion).

The constant-sigma chain ``z_l = sqrt(1 - sigma^2) z_{l-1} + sigma eps`` run until
``sqrt(1 - sigma^2)^L < delta`` becomes, as ``sigma -> 0``, the process (in physical time tau)::

    dz = -z dtau + sqrt(2) dw,        z_tau = e^{-tau} z_0 + sqrt(1 - e^{-2 tau}) eps

stopped at ``tau_end = log(1 / delta)``, where ``e^{-tau_end} = delta``. dkit's time is
``t = tau / tau_end`` in ``[0, 1]``, so ``log alpha(t) = -t tau_end`` and ``beta(t) = 2 tau_end``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.processes.base import Tensor
from diffusers_kit.processes.vp import VariancePreserving


class OU(VariancePreserving):
    """Ornstein-Uhlenbeck SDE ``dz = -z dtau + sqrt(2) dw`` up to ``e^{-tau} = delta`` (TTIC notes).

    Args:
        delta: signal left at the end, ``alpha(1) = delta``; the physical horizon is
            ``tau_end = log(1 / delta)``. The constant-sigma chain with the same delta tends to
            this process as its sigma goes to 0.
    """

    t_min = 1e-3

    def __init__(self, delta: Annotated[float, Field(gt=0, lt=1)] = 0.01) -> None:
        self.delta = float(delta)
        self.horizon = math.log(1.0 / self.delta)

    def __repr__(self) -> str:
        return f"OU(delta={self.delta})"

    def physical_time(self, t: Tensor) -> Tensor:
        """``tau = t * log(1 / delta)``, the time of the SDE ``dz = -z dtau + sqrt(2) dw``."""
        return t * self.horizon

    def log_alpha(self, t: Tensor) -> Tensor:
        return -self.physical_time(t)

    def beta(self, t: Tensor) -> Tensor:
        return torch.full_like(t, 2.0 * self.horizon)

"""The constant-sigma chain of the TTIC 31230 notes (McAllester, "Diffusion Model Basics").

Every step adds noise of the same size, so that unit variance is preserved::

    z_l = sqrt(1 - sigma^2) z_{l-1} + sigma eps,      z_l = a^l z_0 + sqrt(1 - a^{2l}) eps,
    a = sqrt(1 - sigma^2)

and the chain stops at L, the least integer with ``a^L < delta``. It is DDPM with
``beta_l = sigma^2`` for every step; as ``sigma -> 0`` it becomes the Ornstein-Uhlenbeck SDE
(:class:`diffusers_kit.processes.ou.OU`) with the same ``delta``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.processes.ddpm import DDPM, MAX_STEPS


def chain_length(sigma: float, delta: float) -> int:
    """The least integer L with ``sqrt(1 - sigma^2)^L < delta``."""
    log_a = 0.5 * math.log1p(-sigma * sigma)
    log_delta = math.log(delta)
    length = max(1, math.floor(log_delta / log_a) + 1)
    # the float division may land one off near an integer: settle it on the definition
    while length > 1 and (length - 1) * log_a < log_delta:
        length -= 1
    while length * log_a >= log_delta:
        length += 1
    return length


class ConstantSigma(DDPM):
    """Constant-sigma chain ``z_l = sqrt(1 - sigma^2) z_{l-1} + sigma eps`` (TTIC 31230 notes).

    Args:
        sigma: noise added at every step (``beta_l = sigma^2``).
        delta: the chain runs until the remaining signal ``sqrt(1 - sigma^2)^L`` drops below delta.
    """

    #: Equal log-SNR steps (not DDPM's quadratic grid): ``log alpha`` is linear in ``t`` here,
    #: as for the OU process (the comparison of the grids is in ``docs/solvers.md``).
    default_spacing = "log_snr"

    def __init__(
        self,
        sigma: Annotated[float, Field(gt=0, lt=1)] = 0.1,
        delta: Annotated[float, Field(gt=0, lt=1)] = 0.01,
    ) -> None:
        length = chain_length(sigma, delta)
        if length > MAX_STEPS:
            raise ValueError(
                f"sigma={sigma} needs {length} steps to reach delta={delta}; "
                f"at most {MAX_STEPS} are supported (raise sigma or delta)"
            )
        self.sigma_step = float(sigma)
        self.delta = float(delta)
        self.schedule = "constant"
        self._settings = {"schedule": "constant"}
        self._set_betas(torch.full((length,), self.sigma_step**2, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"ConstantSigma(sigma={self.sigma_step}, delta={self.delta}, L={self.num_steps})"

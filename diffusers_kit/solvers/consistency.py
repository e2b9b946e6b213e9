"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
Algorithm 1).

A consistency model ``f(x_t, t)`` maps any point of a probability-flow trajectory to its start
at the smallest noise level ``varsigma_min = sigma / alpha`` at ``t_min`` (its data prediction
``x0_hat``; :class:`~diffusers_kit.networks.precond.ConsistencyPrecond`, network
``consistency_precond``, makes a network one). One evaluation at ``t = 1`` is a sample; more
steps alternate noising and mapping back, at decreasing noise levels ``tau_1 > ... >
tau_{K-1}``::

    x <- f(x_1, 1)                                          x_1 from the prior
    for k = 1 .. K-1:
        x_{tau_k} = alpha_k (x + sqrt(tau_k^2 - varsigma_min^2) z),     z ~ N(0, I)
        x <- f(x_{tau_k}, t_k)

in ``y = x / alpha`` (on the VE / EDM process, ``alpha = 1``, this is Algorithm 1 as printed).
``K`` steps cost ``K`` network evaluations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.hookspecs import OptionError
from diffusers_kit.solvers.base import Callback, ClipX0, Solver, clip_data, options
from diffusers_kit.solvers.grids import (
    Spacing,
    as_scalars,
    reaches_pure_noise,
    sampling_times,
    time_of_log_snr,
)
from diffusers_kit.solvers.noise import Noise

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


@dataclass(frozen=True)
class ConsistencyGrid:
    """The evaluation times ``t[0] = 1 > t[1] > ... > t[K-1]`` then ``t[K] = t_min`` (where the
    samples land), and per step ``k >= 1`` the noising ``x_k = alpha_k x + noise_std_k z``."""

    t: list[float]
    alpha: list[float]
    noise_std: list[float]
    tensors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return len(self.t) - 1


@options
class ConsistencySampler(Solver):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; see the module doc) of a
    consistency model (objective ``consistency_distillation``).

    Args:
        steps: network evaluations K (1: one-step generation).
        levels: the noise levels ``tau_1 > ... > tau_{K-1}`` (``sigma / alpha``) of steps 2..K;
            default: the grid ``spacing`` lays from ``t = 1`` to ``t_min`` with K + 1 points,
            without its last (``t_min``, where the model is the identity).
        spacing: the default levels' spacing (``edm``: Karras et al. 2022's ``rho`` spacing).
        rho: the exponent of the ``edm`` / ``power`` spacing.
        clip_x0: clamp each ``f`` output to ``[-clip_x0, clip_x0]`` (pixels in [-1, 1]: 1.0).
    """

    samples_from = "consistency"

    steps: Annotated[int, Field(ge=1, le=1000)] = 1
    levels: list[Annotated[float, Field(gt=0, le=1e9)]] | None = None
    spacing: Spacing = "edm"
    rho: Annotated[float, Field(gt=0, le=100)] = 7.0
    clip_x0: ClipX0 = None

    def __post_init__(self) -> None:
        steps, levels = self.steps, self.levels
        if levels is not None:
            if len(levels) != steps - 1:
                raise OptionError("levels", f"the noise levels of steps 2..{steps}: "
                                  f"{steps - 1} of them for steps: {steps}", levels)
            if any(b >= a for a, b in itertools.pairwise(levels)):
                raise OptionError("levels", "decreasing noise levels", levels)
            self.levels = [float(v) for v in levels]

    def check(self, process: NoiseProcess) -> str | None:
        if reaches_pure_noise(process):
            return ("a process with alpha > 0 on the whole path (a consistency model maps "
                    "x / alpha; this process reaches pure noise at t = 1)")
        if self.levels:
            low, high = _level_range(process)
            outside = [v for v in self.levels if not low < v < high]
            if outside:
                return (f"levels between this process's noise levels at t_min and at t = 1 "
                        f"({low:.4g}, {high:.4g}); got {outside}")
        return None

    def grid(self, process: NoiseProcess) -> ConsistencyGrid:
        t_min = float(process.t_min)
        if self.levels is None:
            times = sampling_times(process, self.steps + 1, self.spacing, self.rho)[:-1].tolist()
            times[-1] = t_min
        else:
            lam = -2.0 * torch.log(torch.tensor(self.levels, dtype=torch.float64))
            inner = time_of_log_snr(process, lam, t_min, 1.0).tolist()
            times = [1.0, *inner, t_min]
        t = torch.tensor(times, dtype=torch.float64)
        alpha, sigma = process.marginal(t)
        level = (sigma / alpha).tolist()
        noise_std = [0.0] + [a * math.sqrt(max(v**2 - level[-1] ** 2, 0.0))
                             for a, v in zip(alpha.tolist()[1:-1], level[1:-1], strict=True)]
        return ConsistencyGrid(times, alpha.tolist(), noise_std)

    def run(self, model: ScoreModel, x: torch.Tensor, grid: ConsistencyGrid, noise: Noise,
            callback: Callback) -> torch.Tensor:
        alpha = as_scalars(grid.tensors, "alpha", grid.alpha, x)
        for k in range(grid.steps):
            if k > 0:
                x = x * alpha[k] + grid.noise_std[k] * noise.randn_like(x)
            t = torch.full((x.shape[0],), grid.t[k], device=x.device, dtype=x.dtype)
            x0 = clip_data(model.predict(x, t, "x0"), self.clip_x0)
            callback(k, x, x0)
            x = x0
        return x


def _level_range(process: NoiseProcess) -> tuple[float, float]:
    alpha, sigma = process.marginal(torch.tensor([float(process.t_min), 1.0],
                                                 dtype=torch.float64))
    low, high = (sigma / alpha).tolist()
    return low, high

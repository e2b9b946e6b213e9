"""Langevin dynamics and annealed Langevin dynamics (Song & Ermon 2019, section 2.2, Algorithm 1).

Langevin dynamics samples a density p from its score alone::

    x <- x + (alpha / 2) * grad log p(x) + sqrt(alpha) * z,    z ~ N(0, I)

which converges to p as alpha -> 0 and the number of steps grows (the unadjusted Langevin
algorithm; for a Gaussian N(m, v) its stationary variance is v / (1 - alpha / (4 v))).

Annealed Langevin dynamics: for each noise level ``i = 1..L`` (``sigma_1 > ... > sigma_L``),
with step size ``alpha_i = epsilon * sigma_i^2 / sigma_L^2``, run ``T`` steps of::

    x <- x + (alpha_i / 2) * s_theta(x, sigma_i) + sqrt(alpha_i) * z,    z ~ N(0, I)

and optionally finish with one denoising step ``x <- x + sigma_L^2 * s_theta(x, sigma_L)``
(Tweedie's formula; Jolicoeur-Martineau et al. 2021), which removes the last level's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.solvers.base import Callback, Solver, Steps, model_device, options, start
from diffusers_kit.solvers.noise import Noise

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


@dataclass(frozen=True)
class LangevinGrid:
    """Per Langevin step: the time ``t``, ``alpha`` and ``sigma`` of the score it follows and
    its step size (the last point: where the chain ends, or the denoising step)."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    step: list[float]


def langevin_grid(process: NoiseProcess, times: torch.Tensor, repeat: int, sizes: list[float],
                  tail: int) -> LangevinGrid:
    """Each of ``times`` (float64) repeated ``repeat`` times with its step size, then the last
    time ``tail`` more times (step size 0)."""
    alpha, sigma = process.marginal(times)
    columns = [values.tolist() for values in (times, alpha, sigma)] + [sizes]
    spread = [[v for v in values for _ in range(repeat)] + [values[-1]] * tail
              for values in columns]
    spread[3][-tail:] = [0.0] * tail
    return LangevinGrid(*spread)


def langevin(model: ScoreModel, x: torch.Tensor, grid: LangevinGrid, noise: Noise,
             callback: Callback, steps: int, denoised: bool = True) -> torch.Tensor:
    """``steps`` Langevin steps ``x <- x + (a_k / 2) s(x, t_k) + sqrt(a_k) z`` along ``grid``
    (``s = -eps_hat / sigma``), each reported (with ``denoised``: and its Tweedie estimate
    ``x0_hat = (x - sigma eps_hat) / alpha``)."""
    times = torch.tensor(grid.t, dtype=x.dtype, device=x.device)
    for k in range(steps):
        t = times[k].expand(x.shape[0])
        alpha, sigma, size = grid.alpha[k], grid.sigma[k], grid.step[k]
        eps = model.predict(x, t, "eps", marginal=(alpha, sigma))
        callback(k, x, (x - sigma * eps) / alpha if denoised and callback.wants(k) else None)
        x = x + (-0.5 * size / sigma) * eps + size**0.5 * noise.randn_like(x)
    return x


def tweedie(model: ScoreModel, x: torch.Tensor, grid: LangevinGrid) -> torch.Tensor:
    """``x0_hat = (x + sigma^2 s(x, t)) / alpha = (x - sigma eps_hat) / alpha`` at the grid's
    last point (Tweedie's formula)."""
    alpha, sigma = grid.alpha[-1], grid.sigma[-1]
    t = torch.full((x.shape[0],), grid.t[-1], device=x.device)
    return (x - sigma * model.predict(x, t, "eps", marginal=(alpha, sigma))) / alpha


@options
class AnnealedLangevin(Solver):
    """Annealed Langevin dynamics over the process's noise ladder (NCSN).

    Args:
        steps_per_level: Langevin steps T at each noise level.
        epsilon: base step size; level i uses epsilon * sigma_i^2 / sigma_L^2.
        denoise: finish with the Tweedie denoising step x + sigma_L^2 * s(x, sigma_L).

    Recording (``record``) keeps ``x`` at evenly spaced Langevin steps over all levels (the
    denoising step counted last); the chain forms no ``x0_hat``.
    """

    steps_per_level: Steps = 100
    epsilon: Annotated[float, Field(gt=0, le=10)] = 2e-5
    denoise: bool = True

    def check(self, process: NoiseProcess) -> str | None:
        if missing := process.lacks(process.NOISE_LADDER):
            return (f"a process with a discrete noise ladder (such as ve); this one lacks "
                    f"{', '.join(missing)}")
        return None

    def grid(self, process: NoiseProcess) -> LangevinGrid:
        times = getattr(process, "level_times")()  # noqa: B009  (checked by check())
        sigmas = process.sigma(times).tolist()
        sizes = [self.epsilon * s**2 / sigmas[-1] ** 2 for s in sigmas]
        return langevin_grid(process, times, self.steps_per_level, sizes, 1 + self.denoise)

    def run(self, model: ScoreModel, x: torch.Tensor, grid: LangevinGrid, noise: Noise,
            callback: Callback) -> torch.Tensor:
        steps = len(grid.t) - 1 - self.denoise
        x = langevin(model, x, grid, noise, callback, steps, denoised=False)
        if self.denoise:
            x = tweedie(model, x, grid)
            callback(steps, x)
        return x


@options
class Langevin(Solver):
    """Langevin dynamics with the score at one fixed time: ``x + (a/2) s(x, t) + sqrt(a) z``.

    Not annealed: the score is taken at ``time`` (default: the process's ``t_min``, the least
    noisy marginal it defines), so the chain samples ``q_time``. As Song & Ermon 2019 point out,
    it mixes slowly between well-separated modes; annealed Langevin dynamics fixes that.

    Args:
        steps: number of Langevin steps.
        step_size: the step size a (alpha in Song & Ermon 2019, eq. 4).
        time: process time whose score drives the chain (default: the process's t_min).
        init: start from N(0, init_std^2 I) (``normal``) or from the process's prior.
        init_std: standard deviation of the ``normal`` start.
        denoise: finish with Tweedie's estimate x0_hat = (x + sigma(t)^2 s(x, t)) / alpha(t).
    """

    steps: Steps = 1000
    step_size: Annotated[float, Field(gt=0, le=10)] = 1e-3
    time: Annotated[float, Field(ge=0, le=1)] | None = None
    init: Literal["normal", "prior"] = "normal"
    init_std: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    denoise: bool = False

    def grid(self, process: NoiseProcess) -> LangevinGrid:
        time = process.t_min if self.time is None else self.time
        return langevin_grid(process, torch.tensor([time], dtype=torch.float64), self.steps,
                             [self.step_size], 1)

    def initial(self, model: ScoreModel, shape: tuple[int, ...], noise: Noise,
                x_T: torch.Tensor | None) -> torch.Tensor:
        if self.init == "prior" or x_T is not None:
            return start(model, shape, noise, x_T)
        return self.init_std * noise.randn(shape, device=model_device(model))

    def run(self, model: ScoreModel, x: torch.Tensor, grid: LangevinGrid, noise: Noise,
            callback: Callback) -> torch.Tensor:
        x = langevin(model, x, grid, noise, callback, self.steps)
        return tweedie(model, x, grid) if self.denoise else x

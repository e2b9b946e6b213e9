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

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


class AnnealedLangevin(Solver):
    """Annealed Langevin dynamics over the process's noise ladder (NCSN).

    Args:
        steps_per_level: Langevin steps T at each noise level.
        epsilon: base step size; level i uses epsilon * sigma_i^2 / sigma_L^2.
        denoise: finish with the Tweedie denoising step x + sigma_L^2 * s(x, sigma_L).
        keep_trajectory: also return x after each noise level.
    """

    def __init__(
        self,
        steps_per_level: Annotated[int, Field(ge=1, le=100_000)] = 100,
        epsilon: Annotated[float, Field(gt=0)] = 2e-5,
        denoise: bool = True,
        keep_trajectory: bool = False,
    ) -> None:
        self.steps_per_level = steps_per_level
        self.epsilon = epsilon
        self.denoise = denoise
        self.keep_trajectory = keep_trajectory

    def check(self, process: NoiseProcess) -> str | None:
        if not hasattr(process, "levels"):
            return "a process with a discrete noise ladder (such as ve)"
        return None

    def total_steps(self, process: NoiseProcess) -> int:
        return process.num_levels * self.steps_per_level + int(self.denoise)  # type: ignore[attr-defined]

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> SampleResult:
        process = model.process
        device = model_device(model)
        times = process.level_times(device=device).float()  # type: ignore[attr-defined]
        sigmas = process.sigma(times)
        step_sizes = self.epsilon * sigmas**2 / sigmas[-1] ** 2  # the whole table, once
        noise_scales = step_sizes.sqrt()
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        batch = torch.ones(shape[0], device=device)
        trajectory = []
        for level in range(len(times)):
            t = batch * times[level]
            for _ in range(self.steps_per_level):
                z = torch.randn(shape, generator=generator, device=device)
                x = x + 0.5 * step_sizes[level] * model.score(x, t) + noise_scales[level] * z
            if progress is not None:
                progress(self.steps_per_level)
            if self.keep_trajectory:
                trajectory.append(x.clone())
        if self.denoise:
            t = batch * times[-1]
            x = x + sigmas[-1] ** 2 * model.score(x, t)
            if progress is not None:
                progress(1)
        return SampleResult(x, model.nfe - start, trajectory)


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
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return the denoised estimates x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 1000,
        step_size: Annotated[float, Field(gt=0)] = 1e-3,
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
        init: Literal["normal", "prior"] = "normal",
        init_std: Annotated[float, Field(gt=0)] = 1.0,
        denoise: bool = False,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        self.steps = steps
        self.step_size = step_size
        self.time = time
        self.init = init
        self.init_std = init_std
        self.denoise = denoise
        self.keep_trajectory = keep_trajectory
        self.keep_x0 = keep_x0
        self.snapshots = snapshots

    def total_steps(self, process: NoiseProcess) -> int:
        return self.steps

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> SampleResult:
        process = model.process
        device = model_device(model)
        time = process.t_min if self.time is None else self.time
        t = torch.full((shape[0],), time, device=device)
        if self.init == "prior":
            x = process.prior_sample(shape, generator=generator, device=device)
        else:
            x = self.init_std * torch.randn(shape, generator=generator, device=device)
        half_step, noise_scale = 0.5 * self.step_size, self.step_size**0.5
        recorder = Recorder(self.steps, trajectory=self.keep_trajectory, x0=self.keep_x0,
                            snapshots=self.snapshots, times=[time] * self.steps)
        alpha, sigma = (float(c) for c in process.marginal(torch.tensor([time],
                                                                         dtype=torch.float64)))
        start = model.nfe
        score = None
        for step in range(self.steps):
            score = model.score(x, t)
            if recorder.wants(step):
                recorder.record(step, x, (x + sigma**2 * score) / alpha)
            z = torch.randn(shape, generator=generator, device=device)
            x = x + half_step * score + noise_scale * z
            if progress is not None and (step + 1) % 100 == 0:
                progress(100)
        if progress is not None and self.steps % 100:
            progress(self.steps % 100)
        if self.denoise:
            # Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log q_t(x_t)) / alpha
            x = (x + sigma**2 * model.score(x, t)) / alpha
        return recorder.result(x, model.nfe - start)

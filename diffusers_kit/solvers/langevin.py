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

from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device, start
from diffusers_kit.solvers.noise import Noise, as_noise

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


class AnnealedLangevin(Solver):
    """Annealed Langevin dynamics over the process's noise ladder (NCSN).

    Args:
        steps_per_level: Langevin steps T at each noise level.
        epsilon: base step size; level i uses epsilon * sigma_i^2 / sigma_L^2.
        denoise: finish with the Tweedie denoising step x + sigma_L^2 * s(x, sigma_L).

    Recording ``x`` (``record: {what: [x]}``) keeps x after each noise level.
    """

    def __init__(
        self,
        steps_per_level: Annotated[int, Field(ge=1, le=100_000)] = 100,
        epsilon: Annotated[float, Field(gt=0, le=10)] = 2e-5,
        denoise: bool = True,
    ) -> None:
        self.steps_per_level = steps_per_level
        self.epsilon = epsilon
        self.denoise = denoise

    def check(self, process: NoiseProcess) -> str | None:
        if missing := process.lacks(process.NOISE_LADDER):
            return (f"a process with a discrete noise ladder (such as ve); this one lacks "
                    f"{', '.join(missing)}")
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
        noise: Noise | None = None,
        x_T: torch.Tensor | None = None,
    ) -> SampleResult:
        process = model.process
        device = model_device(model)
        noise = as_noise(generator, noise)
        levels = process.level_times()  # type: ignore[attr-defined]
        sigmas = process.sigma(levels).tolist()  # host floats: the whole table, once
        step_sizes = [self.epsilon * s**2 / sigmas[-1] ** 2 for s in sigmas]
        begin = model.nfe
        x = start(model, shape, noise, x_T)
        times = levels[:, None].to(device, torch.float32).expand(-1, shape[0])
        trajectory = []
        keep = self.keep_trajectory
        for level in range(len(sigmas)):
            t, sigma = times[level], sigmas[level]
            half, scale = 0.5 * step_sizes[level], step_sizes[level] ** 0.5
            for _ in range(self.steps_per_level):
                z = noise.randn(shape, device=device)
                # s = -eps / sigma: the level's sigma from the table, no per-step schedule work
                x = x + (-half / sigma) * model.predict(x, t, "eps") + scale * z
            if progress is not None:
                progress(self.steps_per_level)
            if keep:
                trajectory.append(x.clone())
        if self.denoise:
            x = x - sigmas[-1] * model.predict(x, times[-1], "eps")  # x + sigma^2 s
            if progress is not None:
                progress(1)
        return SampleResult(x, model.nfe - begin, trajectory)


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

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 1000,
        step_size: Annotated[float, Field(gt=0, le=10)] = 1e-3,
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
        init: Literal["normal", "prior"] = "normal",
        init_std: Annotated[float, Field(gt=0, le=1e6)] = 1.0,
        denoise: bool = False,
    ) -> None:
        self.steps = steps
        self.step_size = step_size
        self.time = time
        self.init = init
        self.init_std = init_std
        self.denoise = denoise

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
        noise: Noise | None = None,
        x_T: torch.Tensor | None = None,
    ) -> SampleResult:
        process = model.process
        device = model_device(model)
        noise = as_noise(generator, noise)
        time = process.t_min if self.time is None else self.time
        t = torch.full((shape[0],), time, device=device)
        if self.init == "prior" or x_T is not None:
            x = start(model, shape, noise, x_T)
        else:
            x = self.init_std * noise.randn(shape, device=device)
        half_step, noise_scale = 0.5 * self.step_size, self.step_size**0.5
        recorder = Recorder(self.steps, self.record, [time] * self.steps)
        alpha, sigma = (float(c) for c in process.marginal(torch.tensor([time],
                                                                         dtype=torch.float64)))
        begin = model.nfe
        score = None
        for step in range(self.steps):
            score = model.score(x, t)
            if recorder.wants(step):
                recorder.record(step, x, (x + sigma**2 * score) / alpha)
            z = noise.randn(shape, device=device)
            x = x + half_step * score + noise_scale * z
            if progress is not None and (step + 1) % 100 == 0:
                progress(100)
        if progress is not None and self.steps % 100:
            progress(self.steps % 100)
        if self.denoise:
            # Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log q_t(x_t)) / alpha
            x = (x + sigma**2 * model.score(x, t)) / alpha
        return recorder.result(x, model.nfe - begin)

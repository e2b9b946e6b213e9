"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

For each noise level ``i = 1..L`` (``sigma_1 > ... > sigma_L``), with step size
``alpha_i = epsilon * sigma_i^2 / sigma_L^2``, run ``T`` steps of::

    x <- x + (alpha_i / 2) * s_theta(x, sigma_i) + sqrt(alpha_i) * z,    z ~ N(0, I)

and optionally finish with one denoising step ``x <- x + sigma_L^2 * s_theta(x, sigma_L)``
(Tweedie's formula; Jolicoeur-Martineau et al. 2021), which removes the last level's noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.solvers.base import Progress, SampleResult, Solver

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
        steps_per_level: Annotated[int, Field(ge=1)] = 100,
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
        device = next(model.parameters()).device
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

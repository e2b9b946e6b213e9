"""Reverse-time SDE samplers: predictors, correctors and predictor-corrector sampling.

Song et al. 2021 ("Score-Based Generative Modeling through SDEs", section 4.2, Algorithms 2-3
and appendix G). The reverse of ``dx = f(x, t) dt + g(t) dw`` is
``dx = [f(x, t) - g(t)^2 grad log q_t(x)] dt + g(t) dw_bar`` (eq. 6). On a grid
``t_0 = 1 > ... > t_N = 0``, with ``dt = t_i - t_{i+1} > 0`` and ``s = score(x, t_i)``:

* Euler-Maruyama: ``x <- x - [f(x, t_i) - g(t_i)^2 s] dt + g(t_i) sqrt(dt) z``;
* reverse diffusion (eq. 46): reverse the forward discretisation ``x_{i+1} = a x_i + b z``
  (``a, b`` the process's transition between the two times):
  ``x <- x - (a - 1) x + b^2 s + b z``;
* ancestral sampling (eq. 47 for VP, 48 for VE): the posterior mean with Tweedie's
  ``x0_hat = (x + sigma_t^2 s) / alpha_t`` plus noise of the posterior (``beta~``) or
  transition (``beta``) variance.

The Langevin corrector (Algorithm 4 for VP, 5 for VE) runs at each time before the predictor::

    eps = 2 a_i (r ||z|| / ||s||)^2,    x <- x + eps s + sqrt(2 eps) z

with signal-to-noise ratio ``r`` and ``a_i = a^2`` the squared transition coefficient of the
step (``1 - beta_i`` for VP, 1 for VE). As in Song et al.'s code the norms are averaged over the
batch: per-sample norms make the step explode in low dimension. The last predictor
step returns its mean, without noise (Song et al.'s "noise removal").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.solvers.ancestral import on_device
from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device
from diffusers_kit.solvers.grids import Spacing, sampling_times

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def sde_coefficients(process: NoiseProcess, times: Tensor) -> dict[str, Tensor]:
    """Everything a predictor or corrector needs for the steps ``times[i] -> times[i + 1]``.

    The drift of every process here is linear, ``f(x, t) = f_t x``; ``f_t`` is read off the
    process's ``drift`` once per grid.
    """
    t, s = times[:-1], times[1:]
    drift = process.drift(torch.ones(len(t), 1, dtype=torch.float64), t)[:, 0]
    g = process.diffusion(t)
    a, b = process.transition(t, s)
    c_t, c_0, posterior_var = process.posterior_coefficients(t, s)
    alpha_t, sigma_t = process.marginal(t)
    return {"t": t, "dt": t - s, "drift": drift, "g2": g * g, "a": a, "b2": b * b,
            "c_t": c_t, "c_0": c_0, "posterior_var": posterior_var, "alpha_t": alpha_t,
            "sigma_t": sigma_t}


class Predictor:
    """Base of predictors: one step of a reverse-time SDE solver from ``times[i]`` to ``[i+1]``.

    ``step`` gets the score at ``(x, t_i)`` (computed once by the sampler) and returns
    ``(x, mean)``: the next state and its noise-free mean.
    """

    uses_score = True

    def step(self, x: Tensor, score: Tensor, c: dict[str, Tensor], i: int, z: Tensor | None
             ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class EulerMaruyama(Predictor):
    """Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6)."""

    def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
        dt = c["dt"][i]
        mean = x - (c["drift"][i] * x - c["g2"][i] * score) * dt
        if z is None:
            return mean, mean
        return mean + torch.sqrt(c["g2"][i] * dt) * z, mean


class ReverseDiffusion(Predictor):
    """Reverse-diffusion predictor (Song et al. 2021, eq. 46): the forward step, reversed."""

    def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
        mean = (2.0 - c["a"][i]) * x + c["b2"][i] * score
        if z is None:
            return mean, mean
        return mean + torch.sqrt(c["b2"][i]) * z, mean


class AncestralPredictor(Predictor):
    """Ancestral-sampling predictor (Song et al. 2021, eqs. 47-48): posterior mean with Tweedie's
    x0_hat, plus noise.

    Args:
        variance: ``posterior`` (beta~, Song et al.'s choice for VE) or ``transition`` (beta,
            their choice for VP).
    """

    def __init__(self, variance: Literal["posterior", "transition"] = "posterior") -> None:
        self.variance = variance

    def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
        sigma2 = c["sigma_t"][i] ** 2
        x0 = (x + sigma2 * score) / c["alpha_t"][i]
        mean = c["c_t"][i] * x + c["c_0"][i] * x0
        if z is None:
            return mean, mean
        var = c["posterior_var"][i] if self.variance == "posterior" else c["b2"][i]
        return mean + torch.sqrt(var) * z, mean


class NoPredictor(Predictor):
    """No predictor: x stays; time moves on (corrector-only sampling, "C2000" in Song et al.)."""

    uses_score = False

    def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
        return x, x


class Corrector:
    """Base of correctors: score-based MCMC at a fixed time that moves x toward ``q_t``."""

    steps: int = 0

    def correct(self, model: ScoreModel, x: Tensor, t: Tensor, c: dict[str, Tensor], i: int,
                generator: torch.Generator | None) -> Tensor:
        return x


class LangevinCorrector(Corrector):
    """Langevin corrector with the signal-to-noise step rule (Song et al. 2021, Algorithms 4-5).

    Args:
        snr: the signal-to-noise ratio r (Song et al.: 0.16 for VE; 0.01 for VP on CIFAR-10).
        steps: corrector steps M at each time.
    """

    def __init__(
        self,
        snr: Annotated[float, Field(gt=0)] = 0.16,
        steps: Annotated[int, Field(ge=1)] = 1,
    ) -> None:
        self.snr = snr
        self.steps = steps

    def correct(self, model, x, t, c, i, generator):  # type: ignore[no-untyped-def]
        scale = 2.0 * c["a"][i] ** 2 * self.snr**2
        for _ in range(self.steps):
            score = model.score(x, t)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            # batch-averaged norms (as Song et al.): a per-sample ratio explodes in low
            # dimensions, where a sample at a mode's centre has a score near zero
            ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()
            eps = scale * ratio**2
            x = x + eps * score + torch.sqrt(2.0 * eps) * z
        return x


class NoCorrector(Corrector):
    """No corrector (predictor-only sampling, "P1000" in Song et al.)."""


class PredictorCorrector(Solver):
    """Predictor-corrector sampling of the reverse-time SDE (Song et al. 2021, Algorithm 1).

    Any predictor (``euler_maruyama``, ``reverse_diffusion``, ``ancestral``, ``none``) with any
    corrector (``langevin``, ``none``), each a nested ``{kind: ...}`` mapping in a spec.

    Args:
        predictor: the predictor (default: reverse diffusion).
        corrector: the corrector (default: none, i.e. predictor-only sampling).
        steps: number of predictor steps (default: a discrete process's steps; 1000 otherwise).
        spacing: how the times are spaced.
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return Tweedie's x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        predictor: Predictor | None = None,
        corrector: Corrector | None = None,
        steps: Annotated[int, Field(ge=1)] | None = None,
        spacing: Spacing = "uniform",
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        self.predictor = predictor if predictor is not None else ReverseDiffusion()
        self.corrector = corrector if corrector is not None else NoCorrector()
        self.steps = steps
        self.spacing = spacing
        self.keep_trajectory = keep_trajectory
        self.keep_x0 = keep_x0
        self.snapshots = snapshots

    def total_steps(self, process: NoiseProcess) -> int:
        return len(sampling_times(process, self.steps, self.spacing)) - 1

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> SampleResult:
        process, device = model.process, model_device(model)
        times = sampling_times(process, self.steps, self.spacing)
        coef = on_device(sde_coefficients(process, times), device)
        steps = len(times) - 1
        recorder = Recorder(steps, trajectory=self.keep_trajectory, x0=self.keep_x0,
                            snapshots=self.snapshots, times=times[:-1].tolist())
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        ones = torch.ones(shape[0], device=device)
        zero = torch.zeros((), device=device)
        for i in range(steps):
            t = ones * coef["t"][i]
            x = self.corrector.correct(model, x, t, coef, i, generator)
            score = model.score(x, t) if self.predictor.uses_score else zero
            if recorder.wants(i):
                x0 = ((x + coef["sigma_t"][i] ** 2 * score) / coef["alpha_t"][i]
                      if self.predictor.uses_score else None)
                recorder.record(i, x, x0)
            last = i == steps - 1
            z = None if last else torch.randn(shape, generator=generator, device=device)
            x, _ = self.predictor.step(x, score, coef, i, z)
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - start)

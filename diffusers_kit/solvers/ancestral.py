"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on the process's steps or a sub-sequence.

Each step draws from ``p(x_s | x_t) = N(mu, sigma_t^2 I)`` whose mean is the posterior mean
``q(x_s | x_t, x0_hat)`` with the predicted ``x0_hat`` (Ho et al. 2020, eqs. 7 and 11)::

    mu = c_t x_t + c_0 x0_hat
       = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t)       (one DDPM step)

and whose variance is fixed (section 3.2) to ``beta~_t`` (``posterior``, the lower bound) or
``beta_t`` (``transition``, the upper bound), or learned (Nichol & Dhariwal 2021, eq. 15)::

    log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t,    frac = (v + 1) / 2

where ``v`` is the second half of the channels of a network with ``learned_variance = True``
(its output has twice the data's channels: the prediction, then ``v``). The last step adds no
noise (Algorithm 2: ``z = 0`` at ``t = 1``) and lands on noise level 0 (see
:mod:`diffusers_kit.solvers.tables`). At that step ``beta~`` is 0: the learned variance's lower
bound is the clipped ``beta~`` of the step above (``beta~_2`` at DDPM's step 1, Nichol & Dhariwal
2021), which only the variational bound uses. All coefficients come from the cached table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.processes.gaussian import learned_log_variance
from diffusers_kit.solvers.base import (
    ClipX0,
    Progress,
    Recorder,
    SampleResult,
    Solver,
    clip_data,
    model_device,
    start,
)
from diffusers_kit.solvers.grids import Spacing, cached
from diffusers_kit.solvers.noise import Noise, as_noise
from diffusers_kit.solvers.tables import scalars, step_table

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def predict_x0_and_eps(
    model: ScoreModel, x: Tensor, t: Tensor, alpha: float, sigma: float, clip: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x0_hat, eps_hat, v)`` with the step's ``alpha``, ``sigma`` from the table; ``v`` is the
    variance output of a learned-variance network (``None`` otherwise). With ``clip``,
    ``x0_hat`` is clamped by :func:`~diffusers_kit.solvers.base.clip_data` and ``eps_hat`` is
    the one consistent with it."""
    if getattr(model.network, "learned_variance", False):
        prediction, v = model.split(model(x, t))
        eps = model.convert(prediction, x, t, "eps")
    else:
        eps, v = model.predict(x, t, "eps"), None
    x0 = (x - sigma * eps) / alpha
    if clip is not None:
        x0 = clip_data(x0, clip)
        eps = (x - alpha * x0) / sigma
    return x0, eps, v


def posterior_mean_map(process: NoiseProcess, grid: tuple, x: Tensor
                       ) -> tuple[list[Tensor], list[float]]:
    """The posterior mean as one map of ``(x_t, eps_hat)`` on the grid ``(steps, spacing)``
    (``x0_hat`` substituted; no clipping): ``c_t x + c_0 (x - sigma_t eps) / alpha_t =
    scale x + mix eps`` with ``scale = c_t + c_0 / alpha_t`` (0-dim tensors of ``x``'s device and
    dtype) and ``mix = -c_0 sigma_t / alpha_t`` (floats), cached. Ancestral sampling and RePaint
    both step ``torch.mul(x, scale[i]).add_(eps, alpha=mix[i])``, so they agree bit for bit."""
    rows = step_table(process, *grid).rows
    key = ("ancestral", *grid)
    scale = scalars(process, key, lambda: [
        c_t + c_0 / a for c_t, c_0, a in zip(rows["c_t"], rows["c_0"], rows["alpha_t"],
                                             strict=True)], x.device, x.dtype)
    mix = cached(process, (*key, "eps"), lambda: [
        -c_0 * s / a for c_0, s, a in zip(rows["c_0"], rows["sigma_t"], rows["alpha_t"],
                                          strict=True)])
    return scale, mix


def eps_map_step(model: ScoreModel, x: Tensor, t: Tensor, i: int, scale: list[Tensor],
                 mix: list[float], rows: dict, recorder: Recorder, record: bool) -> Tensor:
    """``scale[i] x + mix[i] eps_hat(x, t)``: a step that is one linear map of ``(x_t, eps_hat)``
    (ancestral's posterior mean, RePaint's descent, DDIM's update). With ``record``, step ``i``'s
    ``x0_hat = (x - sigma_t eps_hat) / alpha_t`` goes to ``recorder``."""
    eps = model.predict(x, t, "eps")
    if record:
        recorder.record(i, x, (x - rows["sigma_t"][i] * eps) / rows["alpha_t"][i])
    return torch.mul(x, scale[i]).add_(eps, alpha=mix[i])


class Ancestral(Solver):
    """DDPM ancestral sampling with sigma_t^2 = beta~_t, beta_t or learned (Ho et al. 2020).

    Args:
        steps: number of steps (= network evaluations; default: all of a discrete process's
            steps, 1000 otherwise). Fewer steps take a sub-sequence and the posterior between
            its times.
        spacing: how the times are spaced (``uniform``, ``quadratic``, ``edm``, ``log_snr``).
        variance: ``posterior`` (beta~_t), ``transition`` (beta_t) or ``learned`` (a network
            with ``learned_variance``; Nichol & Dhariwal 2021).
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] before each step (images in [-1, 1]:
            1.0; :func:`~diffusers_kit.solvers.base.clip_data`). None: off.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] | None = None,
        spacing: Spacing = "uniform",
        variance: Literal["posterior", "transition", "learned"] = "posterior",
        clip_x0: ClipX0 = None,
    ) -> None:
        self.steps = steps
        self.spacing = spacing
        self.variance = variance
        self.clip_x0 = clip_x0

    def total_steps(self, process: NoiseProcess) -> int:
        return step_table(process, self.steps, self.spacing).steps

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        noise: Noise | None = None,
        x_T: Tensor | None = None,
    ) -> SampleResult:
        process, device = model.process, model_device(model)
        if self.variance == "learned" and not getattr(model.network, "learned_variance", False):
            raise ValueError("variance 'learned' needs a network with learned_variance = True")
        noise = as_noise(generator, noise)
        table = step_table(process, self.steps, self.spacing)
        rows, steps = table.rows, table.steps
        fixed = rows["posterior_var" if self.variance == "posterior" else "transition_var"]
        std = [v**0.5 for v in fixed]
        recorder = Recorder(steps, self.record, rows["t"])
        begin = model.nfe
        x = start(model, shape, noise, x_T, device=device)
        times = table.time_vectors(process, shape[0], device)
        fused = self.clip_x0 is None and self.variance != "learned"
        if fused:
            scale, mix = posterior_mean_map(process, (self.steps, self.spacing), x)
        for i in range(steps):
            if fused:
                mean = eps_map_step(model, x, times[i], i, scale, mix, rows, recorder,
                                    recorder.wants(i))
            else:
                x0, _, v = predict_x0_and_eps(model, x, times[i], rows["alpha_t"][i],
                                              rows["sigma_t"][i], self.clip_x0)
                if recorder.wants(i):
                    recorder.record(i, x, x0)
                mean = rows["c_t"][i] * x + rows["c_0"][i] * x0
            if i == steps - 1:
                x = mean  # the last step returns the mean (Ho et al. 2020, Algorithm 2)
            elif self.variance == "learned":
                assert v is not None
                log_var = learned_log_variance(v, rows["log_transition"][i],
                                               rows["log_posterior_clipped"][i])
                x = mean + torch.exp(0.5 * log_var) * noise.randn_like(x)
            else:
                x = mean.add_(noise.randn_like(x), alpha=std[i])
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - begin)


__all__ = ["Ancestral", "posterior_mean_map", "predict_x0_and_eps"]

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
noise (Algorithm 2: ``z = 0`` at ``t = 1``). All coefficients come from the process's
``posterior_coefficients`` and ``transition``, once per grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.processes.base import expand
from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device
from diffusers_kit.solvers.grids import Spacing, sampling_times

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def step_coefficients(process: NoiseProcess, times: Tensor) -> dict[str, Tensor]:
    """Per-step tables (float64, shape ``(N,)``) for the moves ``times[i] -> times[i + 1]``."""
    t, s = times[:-1], times[1:]
    c_t, c_0, posterior_var = process.posterior_coefficients(t, s)
    transition_var = process.transition(t, s)[1] ** 2
    alpha_t, sigma_t = process.marginal(t)
    alpha_s, sigma_s = process.marginal(s)
    return {"t": t, "c_t": c_t, "c_0": c_0, "posterior_var": posterior_var,
            "transition_var": transition_var, "alpha_t": alpha_t, "sigma_t": sigma_t,
            "alpha_s": alpha_s, "sigma_s": sigma_s}


def on_device(table: dict[str, Tensor], device: torch.device,
              dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {k: v.to(device=device, dtype=dtype) for k, v in table.items()}


def predict_x0_and_eps(
    model: ScoreModel, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, clip: float | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x0_hat, eps_hat, v)``: ``v`` is the variance output of a learned-variance network."""
    network = model.network
    if getattr(network, "learned_variance", False):
        raw = model(x, t)
        output, v = raw.chunk(2, dim=1)
        eps = model.process.convert(output, x, t.to(x.dtype), network.prediction, "eps")
    else:
        eps, v = model.predict(x, t, "eps"), None
    x0 = (x - sigma * eps) / alpha
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x - alpha * x0) / sigma
    return x0, eps, v


class Ancestral(Solver):
    """DDPM ancestral sampling with sigma_t^2 = beta~_t, beta_t or learned (Ho et al. 2020).

    Args:
        steps: number of steps (default: all of a discrete process's steps; 1000 otherwise).
            Fewer steps take a sub-sequence and the posterior between its times.
        spacing: how the times are spaced (``uniform``, ``quadratic``, ``edm``, ``log_snr``).
        variance: ``posterior`` (beta~_t), ``transition`` (beta_t) or ``learned`` (a network
            with ``learned_variance``; Nichol & Dhariwal 2021).
        clip_x0: clip x0_hat to [-clip_x0, clip_x0] (images in [-1, 1]: 1.0).
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1)] | None = None,
        spacing: Spacing = "uniform",
        variance: Literal["posterior", "transition", "learned"] = "posterior",
        clip_x0: Annotated[float, Field(gt=0)] | None = None,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        self.steps = steps
        self.spacing = spacing
        self.variance = variance
        self.clip_x0 = clip_x0
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
        if self.variance == "learned" and not getattr(model.network, "learned_variance", False):
            raise ValueError("variance 'learned' needs a network with learned_variance = True")
        times = sampling_times(process, self.steps, self.spacing)
        table = step_coefficients(process, times)
        steps = len(times) - 1
        transition_var = table["transition_var"].clone()
        posterior_var = table["posterior_var"].clone()
        fixed = posterior_var if self.variance == "posterior" else transition_var
        std = fixed.sqrt()
        std[-1] = 0.0  # the last step returns the mean
        # learned: interpolate log-variances; the last step keeps no noise either way
        log_transition = transition_var.log()
        log_posterior = torch.where(posterior_var > 0, posterior_var, transition_var).log()
        coef = on_device({**table, "std": std, "log_transition": log_transition,
                          "log_posterior": log_posterior}, device)
        recorder = Recorder(steps, trajectory=self.keep_trajectory, x0=self.keep_x0,
                            snapshots=self.snapshots, times=times[:-1].tolist())
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        ones = torch.ones(shape[0], device=device)
        for i in range(steps):
            t = ones * coef["t"][i]
            x0, _, v = predict_x0_and_eps(model, x, t, coef["alpha_t"][i], coef["sigma_t"][i],
                                          self.clip_x0)
            if recorder.wants(i):
                recorder.record(i, x, x0)
            mean = coef["c_t"][i] * x + coef["c_0"][i] * x0
            if i == steps - 1:
                x = mean
            elif self.variance == "learned":
                assert v is not None
                frac = (v + 1.0) / 2.0
                log_var = frac * coef["log_transition"][i] + (1 - frac) * coef["log_posterior"][i]
                z = torch.randn(shape, generator=generator, device=device)
                x = mean + torch.exp(0.5 * log_var) * z
            else:
                z = torch.randn(shape, generator=generator, device=device)
                x = mean + coef["std"][i] * z
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - start)


__all__ = ["Ancestral", "expand", "on_device", "predict_x0_and_eps", "step_coefficients"]

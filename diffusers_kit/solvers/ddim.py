"""DDIM (Song, Meng & Ermon 2021, eq. 12) with eta, on any sub-sequence of the process's steps.

From ``x_t`` with predicted noise ``eps_hat`` and ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``::

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2 = eta^2 * (sigma_s^2 / sigma_t^2) * (sigma_t^2 - a^2 sigma_s^2),   a = alpha_t / alpha_s

``c^2`` is ``eta^2`` times the posterior variance ``beta~`` between ``t`` and ``s`` (eq. 16 in
the VP notation ``(1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)``): ``eta = 0`` is the
deterministic DDIM map (an Euler step of the probability-flow ODE in ``x / alpha`` against
``sigma / alpha``), ``eta = 1`` is DDPM ancestral sampling with ``sigma_t^2 = beta~_t`` on the
same sub-sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.solvers.ancestral import on_device, predict_x0_and_eps, step_coefficients
from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device
from diffusers_kit.solvers.grids import Spacing, sampling_times

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


class DDIM(Solver):
    """Denoising diffusion implicit model sampling with stochasticity eta (Song et al. 2021a).

    Args:
        steps: length of the sub-sequence of times (a discrete process's steps are snapped to).
        eta: 0 is deterministic; 1 equals DDPM ancestral sampling with beta~.
        spacing: ``uniform`` or ``quadratic`` (the DDIM paper's two), or ``edm`` / ``log_snr``.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0] (images in [-1, 1]: 1.0).
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1)] = 50,
        eta: Annotated[float, Field(ge=0, le=1)] = 0.0,
        spacing: Spacing = "uniform",
        clip_x0: Annotated[float, Field(gt=0)] | None = None,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        self.steps = steps
        self.eta = eta
        self.spacing = spacing
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
        times = sampling_times(process, self.steps, self.spacing)
        table = step_coefficients(process, times)
        steps = len(times) - 1
        noise_var = self.eta**2 * table["posterior_var"]
        noise_var[-1] = 0.0  # the last step returns the mean
        eps_coef = (table["sigma_s"] ** 2 - noise_var).clamp_min(0.0).sqrt()
        coef = on_device({**table, "noise": noise_var.sqrt(), "eps_coef": eps_coef}, device)
        stochastic = self.eta > 0
        recorder = Recorder(steps, trajectory=self.keep_trajectory, x0=self.keep_x0,
                            snapshots=self.snapshots, times=times[:-1].tolist())
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        ones = torch.ones(shape[0], device=device)
        for i in range(steps):
            t = ones * coef["t"][i]
            x0, eps, _ = predict_x0_and_eps(model, x, t, coef["alpha_t"][i], coef["sigma_t"][i],
                                            self.clip_x0)
            if recorder.wants(i):
                recorder.record(i, x, x0)
            x = coef["alpha_s"][i] * x0 + coef["eps_coef"][i] * eps
            if stochastic and i < steps - 1:
                x = x + coef["noise"][i] * torch.randn(shape, generator=generator, device=device)
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - start)

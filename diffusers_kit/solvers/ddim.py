"""DDIM (Song, Meng & Ermon 2021, eq. 12) with eta, on any sub-sequence of the process's steps.

From ``x_t`` with predicted noise ``eps_hat`` and ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``::

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2 = eta^2 * (sigma_s^2 / sigma_t^2) * (sigma_t^2 - a^2 sigma_s^2),   a = alpha_t / alpha_s

``c^2`` is ``eta^2`` times the posterior variance ``beta~`` between ``t`` and ``s`` (eq. 16 in
the VP notation ``(1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)``): ``eta = 0`` is the
deterministic DDIM map (an Euler step of the probability-flow ODE in ``x / alpha`` against
``sigma / alpha``), ``eta = 1`` is DDPM ancestral sampling with ``sigma_t^2 = beta~_t`` on the
same sub-sequence. The last step lands on noise level 0 (``x0_hat``; see
:mod:`diffusers_kit.solvers.tables`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.solvers.ancestral import predict_x0_and_eps
from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device, start
from diffusers_kit.solvers.grids import Spacing
from diffusers_kit.solvers.noise import Noise, as_noise
from diffusers_kit.solvers.tables import step_table

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


class DDIM(Solver):
    """Denoising diffusion implicit model sampling with stochasticity eta (Song et al. 2021a).

    Args:
        steps: length of the sub-sequence of times (= network evaluations; a discrete process's
            steps are snapped to, which may merge a few at small ``steps``).
        eta: 0 is deterministic; 1 equals DDPM ancestral sampling with beta~.
        spacing: ``uniform`` or ``quadratic`` (the DDIM paper's two), or ``edm`` / ``log_snr``.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0] (images in [-1, 1]: 1.0).
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 50,
        eta: Annotated[float, Field(ge=0, le=1)] = 0.0,
        spacing: Spacing = "uniform",
        clip_x0: Annotated[float, Field(gt=0, le=1e6)] | None = None,
    ) -> None:
        self.steps = steps
        self.eta = eta
        self.spacing = spacing
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
        x_T: torch.Tensor | None = None,
    ) -> SampleResult:
        process, device = model.process, model_device(model)
        noise = as_noise(generator, noise)
        table = step_table(process, self.steps, self.spacing)
        rows, steps = table.rows, table.steps
        noise_var = [self.eta**2 * v for v in rows["posterior_var"]]  # 0 on the last step
        noise_std = [v**0.5 for v in noise_var]
        eps_coef = [max(s**2 - v, 0.0) ** 0.5 for s, v in zip(rows["sigma_s"], noise_var,
                                                               strict=True)]
        stochastic = self.eta > 0
        recorder = Recorder(steps, self.record, table.times[:-1].tolist())
        begin = model.nfe
        x = start(model, shape, noise, x_T)
        times = table.time_vectors(process, shape[0], device)
        for i in range(steps):
            x0, eps, _ = predict_x0_and_eps(model, x, times[i], rows["alpha_t"][i],
                                            rows["sigma_t"][i], self.clip_x0)
            if recorder.wants(i):
                recorder.record(i, x, x0)
            x = rows["alpha_s"][i] * x0 + eps_coef[i] * eps
            if stochastic and i < steps - 1:
                x = x + noise_std[i] * noise.randn(shape, device=device)
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - begin)

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

from diffusers_kit.solvers.ancestral import eps_map_step, predict_x0_and_eps
from diffusers_kit.solvers.base import (
    ClipX0,
    Progress,
    Recorder,
    SampleResult,
    Solver,
    model_device,
    start,
)
from diffusers_kit.solvers.grids import Spacing, cached
from diffusers_kit.solvers.noise import Noise, as_noise
from diffusers_kit.solvers.tables import scalars, step_table

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
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] before each step (images in [-1, 1]:
            1.0; :func:`~diffusers_kit.solvers.base.clip_data`). None: off.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 50,
        eta: Annotated[float, Field(ge=0, le=1)] = 0.0,
        spacing: Spacing = "uniform",
        clip_x0: ClipX0 = None,
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
        coef = self.coefficients(process)
        stochastic = self.eta > 0
        recorder = Recorder(steps, self.record, table.rows["t"])
        begin = model.nfe
        x = start(model, shape, noise, x_T, device=device)
        times = table.time_vectors(process, shape[0], device)
        scale = scalars(process, self._key("scale"), lambda: coef["scale"], x.device, x.dtype)
        mix, noise_std = coef["eps"], coef["noise_std"]
        for i in range(steps):
            if self.clip_x0 is None:
                x = eps_map_step(model, x, times[i], i, scale, mix, rows, recorder,
                                 recorder.wants(i))
            else:
                x0, eps, _ = predict_x0_and_eps(model, x, times[i], rows["alpha_t"][i],
                                                rows["sigma_t"][i], self.clip_x0)
                if recorder.wants(i):
                    recorder.record(i, x, x0)
                x = rows["alpha_s"][i] * x0 + coef["eps_coef"][i] * eps
            if stochastic and i < steps - 1:
                x.add_(noise.randn_like(x), alpha=noise_std[i])
            if progress is not None:
                progress(1)
        return recorder.result(x, model.nfe - begin)

    def _key(self, name: str) -> tuple:
        return ("ddim", name, self.steps, self.spacing, float(self.eta))

    def coefficients(self, process: NoiseProcess) -> dict[str, list[float]]:
        """Per step, cached with the grid: ``noise_std`` (``c``), ``eps_coef``
        (``sqrt(sigma_s^2 - c^2)``) and the step as one map of ``(x_t, eps_hat)``,
        ``x_s = scale x_t + eps eps_hat`` (``x0_hat`` substituted: ``scale = alpha_s /
        alpha_t``, ``eps = eps_coef - alpha_s sigma_t / alpha_t``; with ``clip_x0`` the loop
        forms ``x0_hat`` to clip it)."""

        def build() -> dict[str, list[float]]:
            rows = step_table(process, self.steps, self.spacing).rows
            noise_var = [self.eta**2 * v for v in rows["posterior_var"]]  # 0 on the last step
            eps_coef = [max(s**2 - v, 0.0) ** 0.5
                        for s, v in zip(rows["sigma_s"], noise_var, strict=True)]
            ratio = [a_s / a_t for a_s, a_t in zip(rows["alpha_s"], rows["alpha_t"], strict=True)]
            return {"noise_std": [v**0.5 for v in noise_var], "eps_coef": eps_coef,
                    "scale": ratio,
                    "eps": [c - r * s for c, r, s in zip(eps_coef, ratio, rows["sigma_t"],
                                                         strict=True)]}

        return cached(process, self._key("coefficients"), build)

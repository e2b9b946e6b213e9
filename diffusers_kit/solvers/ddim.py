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

**A term's own step.** With a guidance term that ``takes_step`` (DDRM,
:class:`diffusers_kit.guidance.DDRM`), each move ``t -> s`` is the term's
(:meth:`Guidance.step <diffusers_kit.guidance.base.Guidance.step>`), from the same
``x0_hat`` (clipped with ``clip_x0``), the same times and the same noise stream; ``eta`` is then
the term's business and this solver's is unused.

The step is taken on the data prediction, with ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``
substituted: ``x_s = (e / sigma_t) x_t + (alpha_s - e alpha_t / sigma_t) x0_hat + c z`` with ``e
= sqrt(sigma_s^2 - c^2)``, defined where ``alpha_t = 0`` too (a path from pure noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.guidance.base import MOVE
from diffusers_kit.solvers.ancestral import data_prediction
from diffusers_kit.solvers.base import Callback, ClipX0, Solver, Steps, options, stepping_term
from diffusers_kit.solvers.grids import OnGrid, Spacing, as_scalars
from diffusers_kit.solvers.noise import Noise
from diffusers_kit.solvers.tables import step_table

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess


@dataclass(frozen=True)
class DDIMGrid(OnGrid):
    """Per step: ``x_s = on_x x_t + on_x0 x0_hat + noise_std z`` (see the module doc)."""

    on_x: list[float]
    on_x0: list[float]
    noise_std: list[float]
    tensors: dict = field(default_factory=dict, repr=False, compare=False)


@options
class DDIM(Solver):
    """Denoising diffusion implicit model sampling with stochasticity eta (Song et al. 2021a).

    Args:
        steps: length of the sub-sequence of times (= network evaluations; a discrete process's
            steps are snapped to, which may merge a few at small ``steps``).
        eta: 0 is deterministic; 1 equals DDPM ancestral sampling with beta~.
        spacing: ``uniform`` or ``quadratic`` (the DDIM paper's two), or ``edm`` / ``log_snr``.
    """

    takes_term_steps = True

    steps: Steps = 50
    eta: Annotated[float, Field(ge=0, le=1)] = 0.0
    spacing: Spacing = "uniform"
    clip_x0: ClipX0 = None

    def grid(self, process: NoiseProcess) -> DDIMGrid:
        table = step_table(process, self.steps, self.spacing)
        rows = table.rows
        grid = DDIMGrid(table, [], [], [])
        for i in range(table.steps):
            var = self.eta**2 * rows["posterior_var"][i]  # 0 on the last step
            e = max(rows["sigma_s"][i] ** 2 - var, 0.0) ** 0.5
            grid.on_x.append(e / rows["sigma_t"][i])
            grid.on_x0.append(rows["alpha_s"][i] - e * rows["alpha_t"][i] / rows["sigma_t"][i])
            grid.noise_std.append(var**0.5)
        return grid

    def run(self, model: ScoreModel, x: torch.Tensor, grid: DDIMGrid, noise: Noise,
            callback: Callback) -> torch.Tensor:
        times, last = grid.table.vectors(x.shape[0], x), grid.table.steps - 1
        term, rows = stepping_term(model), grid.table.rows
        for i in range(grid.table.steps):
            x0, _ = data_prediction(model, x, times[i], grid.table, i, self.clip_x0)
            callback(i, x, x0)
            if term is not None:
                x = term.step(model, x, x0, times[i], {k: rows[k][i] for k in MOVE},
                              noise.randn_like if i < last else None)
                continue
            x = torch.add(x * as_scalars(grid.tensors, "on_x", grid.on_x, x)[i], x0,
                          alpha=grid.on_x0[i])
            if self.eta > 0 and i < last:
                x.add_(noise.randn_like(x), alpha=grid.noise_std[i])
        return x

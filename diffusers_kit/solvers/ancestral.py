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

The step is taken on the data prediction ``x0_hat`` (the model's ``x0`` view), so it is defined
where ``alpha_t = 0`` (a path that reaches pure noise): there ``c_t = 0``, ``c_0 = alpha_s`` and
the posterior is ``N(alpha_s x0_hat, sigma_s^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from diffusers_kit.processes.gaussian import learned_log_variance
from diffusers_kit.solvers.base import Callback, ClipX0, Solver, Steps, clip_data, options
from diffusers_kit.solvers.grids import OnGrid, Spacing, TimeGrid
from diffusers_kit.solvers.noise import Noise
from diffusers_kit.solvers.tables import step_table

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess
    from diffusers_kit.solvers.repaint import RePaint

Tensor = torch.Tensor


@dataclass(frozen=True)
class PosteriorGrid(OnGrid):
    """The grid of the posterior-stepping samplers: the step table and the std of each step's
    noise (``variance``'s: ``beta~`` or ``beta``)."""

    std: list[float]


def posterior_grid(process: NoiseProcess, steps: int | None, spacing: Spacing,
                   variance: str = "posterior") -> PosteriorGrid:
    table = step_table(process, steps, spacing)
    var = table.rows["transition_var" if variance == "transition" else "posterior_var"]
    return PosteriorGrid(table, [v**0.5 for v in var])


def data_prediction(model: ScoreModel, x: Tensor, t: Tensor, table: TimeGrid, i: int,
                    clip: float | None, learned: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(x0_hat, v)`` at step ``i`` (clamped with ``clip``; ``v`` the variance output of a
    learned-variance network when ``learned``, else None), converted with the table's
    ``alpha_t``, ``sigma_t``: no schedule work in the loop."""
    marginal = table.scalar("alpha_t", x)[i], table.scalar("sigma_t", x)[i]
    if learned:
        prediction, v = model.split(model(x, t))
        return clip_data(model.convert(prediction, x, t, "x0", marginal), clip), v
    return clip_data(model.predict(x, t, "x0", marginal=marginal), clip), None


def posterior_step(solver: Ancestral | RePaint, model: ScoreModel, x: Tensor, grid: PosteriorGrid,
                   i: int, t: Tensor, noise: Noise | None, callback: Callback) -> Tensor:
    """One draw from ``p(x_s | x_t) = N(c_t x_t + c_0 x0_hat, std^2)`` at step ``i`` (Ho et al.
    2020, Algorithm 2); ``noise`` None: the mean (the last step). The one step of ancestral
    sampling and RePaint's descent."""
    rows, learned = grid.table.rows, getattr(solver, "variance", None) == "learned"
    x0, v = data_prediction(model, x, t, grid.table, i, solver.clip_x0, learned)
    callback(i, x, x0)
    mean = torch.add(x * grid.table.scalar("c_t", x)[i], x0, alpha=rows["c_0"][i])
    if noise is None:
        return mean
    if v is not None:
        log_var = learned_log_variance(v, rows["log_transition"][i],
                                       rows["log_posterior_clipped"][i])
        return mean + torch.exp(0.5 * log_var) * noise.randn_like(x)
    return mean.add_(noise.randn_like(x), alpha=grid.std[i])


@options
class Ancestral(Solver):
    """DDPM ancestral sampling with sigma_t^2 = beta~_t, beta_t or learned (Ho et al. 2020).

    Args:
        steps: number of steps (= network evaluations; default: all of a discrete process's
            steps, 1000 otherwise). Fewer steps take a sub-sequence and the posterior between
            its times.
        spacing: how the times are spaced (``uniform``, ``quadratic``, ``edm``, ``log_snr``).
        variance: ``posterior`` (beta~_t), ``transition`` (beta_t) or ``learned`` (a network
            with ``learned_variance``; Nichol & Dhariwal 2021).
    """

    steps: Steps | None = None
    spacing: Spacing = "uniform"
    variance: Literal["posterior", "transition", "learned"] = "posterior"
    clip_x0: ClipX0 = None

    def grid(self, process: NoiseProcess) -> PosteriorGrid:
        return posterior_grid(process, self.steps, self.spacing, self.variance)

    def run(self, model: ScoreModel, x: Tensor, grid: PosteriorGrid, noise: Noise,
            callback: Callback) -> Tensor:
        if self.variance == "learned" and not getattr(model.network, "learned_variance", False):
            raise ValueError("variance 'learned' needs a network with learned_variance = True")
        times, last = grid.table.vectors(x.shape[0], x), grid.table.steps - 1
        for i in range(grid.table.steps):
            x = posterior_step(self, model, x, grid, i, times[i], None if i == last else noise,
                               callback)
        return x

__all__ = ["Ancestral", "PosteriorGrid", "data_prediction", "posterior_grid", "posterior_step"]

"""Probability-flow ODE samplers (Song et al. 2021, eq. 13): adaptive scipy and fixed-step torch.

With ``y = x / alpha`` and the noise level ``varsigma = sigma / alpha`` the probability-flow ODE
of every process ``x_t = alpha x0 + sigma eps`` is ``dy / d varsigma = eps_hat`` (DDIM / EDM:
Song et al. 2021a, eq. 14; Karras et al. 2022, eq. 4), and in ``lambda = -log varsigma`` its
exact solution weighs the data prediction ``x0_hat`` by exponential-integrator coefficients (Lu
et al. 2022). The steps here are written in ``x`` on ``x0_hat``: from grid point ``i`` to
``i + 1``, with ``r = varsigma_{i+1} / varsigma_i = e^-h``, ``h = lambda_{i+1} - lambda_i``::

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} sum_j w_j m_j        (:func:`combine`)

over the data predictions ``m_j`` made ``j`` steps ago; Euler (= DDIM, eta = 0) is ``w = [1 -
r]``. No step divides by ``alpha``: from pure noise (``alpha(1) = 0``, ``r = 0``) the first
step is ``x' = sigma' x + alpha' x0_hat``, for a network that predicts ``x0`` there.

* ``heun``: Karras et al. 2022, Alg. 1; the correction on the data predictions with the bounded
  weight :func:`heun_weight` (``form: data``), or Karras' trapezoid on ``eps`` (``noise``);
* ``edm_stochastic``: Alg. 2: before each Heun step the level is raised to ``(1 + gamma_i)
  varsigma_i``, ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` on ``S_tmin <= varsigma_i <=
  S_tmax``, by noise of variance ``S_noise^2 (varsigma_hat^2 - varsigma_i^2)`` (in ``y``);
* ``dpm_solver_2m`` / ``3m``: DPM-Solver++ multistep (Lu et al. 2022, Alg. 2 and its third-order
  form); with ``r_0 = h_{i-1} / h``, ``r_1 = h_{i-2} / h``::

      y_{i+1} = r y_i + (1 - r) D_0 + ((r - 1) / h + 1) D_1 - 2 ((r - 1 + h) / h^2 - 1/2) D_2
      D_0 = m_0,   d_0 = (m_0 - m_1) / r_0,   d_1 = (m_1 - m_2) / r_1
      order 2: y_{i+1} = r y_i + (1 - r)(m_0 + d_0 / 2)
      order 3: D_1 = d_0 + r_0 / (r_0 + r_1) (d_0 - d_1),  D_2 = (d_0 - d_1) / (r_0 + r_1)

  ``D_2 ~ h^2 m'' / 2`` enters with the ``h^3 phi_3`` term's full weight: the reference code
  (and diffusers) halve it, which leaves the order-3 step second order (a test fits the slope).
  Orders follow :func:`usable_orders`.

Every grid ends at ``varsigma = 0`` (the last step lands on ``x0_hat`` without an extra
evaluation); ``spacing: auto`` is the process's ``default_spacing`` (``docs/solvers.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.hookspecs import OptionError
from diffusers_kit.processes.base import expand
from diffusers_kit.solvers.base import (
    Callback,
    ClipX0,
    Rho,
    Solver,
    Steps,
    Times,
    Unsuited,
    clip_data,
    options,
)
from diffusers_kit.solvers.grids import (
    OnGrid,
    Spacing,
    TimeGrid,
    check_times,
    given_times,
    reaches_pure_noise,
    time_grid,
    time_of_log_snr,
)
from diffusers_kit.solvers.noise import Noise

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor
Method = Literal["RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"]


def probability_flow(model: ScoreModel, x: Tensor, t: Tensor) -> Tensor:
    """``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` with the model's score."""
    return model.process.probability_flow_drift(x, t.to(x.dtype), model.score(x, t))


def data_velocity(model: ScoreModel, x: Tensor, t: Tensor) -> Tensor:
    """The probability-flow ODE on the data prediction, ``dx/dt = alpha' x0_hat + sigma' (x -
    alpha x0_hat) / sigma`` (``alpha'``, ``sigma'``: :meth:`NoiseProcess.marginal_rates`): the
    same field as :func:`probability_flow` (substitute ``s = -(x - alpha x0_hat) / sigma^2``
    into ``f x - g^2 s / 2``), defined where ``alpha = 0`` too, where the score carries no
    information about ``x0`` and ``f`` is infinite."""
    # in float64: sigma' = (g^2 + 2 f sigma^2) / (2 sigma) and x0_hat = (x - sigma eps) / alpha
    # cancel near alpha = 0, and float32 noise there steers the adaptive step control
    tt = t.to(torch.float64)
    alpha, sigma, d_alpha, d_sigma = (expand(c, x) for c in (
        *model.process.marginal(tt), *model.process.marginal_rates(tt)))
    x0 = model.predict(x, t, "x0", marginal=(alpha, sigma)).double()
    return d_alpha * x0 + d_sigma * (x - alpha * x0) / sigma


def probability_flow_step(model: ScoreModel, x: Tensor, t: Tensor, s: Tensor,
                          method: Literal["euler", "heun"] = "heun",
                          y: Tensor | None = None) -> Tensor:
    """One step of the probability-flow ODE from the times ``t`` to ``s`` (``(B,)`` tensors: each
    example its own pair), in ``y = x / alpha`` against the noise level ``varsigma = sigma /
    alpha``, where the ODE is ``dy / d varsigma = (y - D(x, t)) / varsigma`` (Karras et al. 2022,
    eq. 4 / Algorithm 1; ``D`` the data prediction ``x0_hat``)::

        d   = (y_t - D(x_t, t)) / varsigma_t,       y_E = y_t + (varsigma_s - varsigma_t) d
        euler: y_s = y_E
        heun:  y_s = y_t + (varsigma_s - varsigma_t) (d + d') / 2,
               d'  = (y_E - D(alpha_s y_E, s)) / varsigma_s

    and ``x_s = alpha_s y_s``. Euler is the DDIM step; Heun is second order (local error
    ``O(h^3)``, a test fits it on Gaussian data, where the exact flow map is linear). Both
    noise levels must be positive (``alpha > 0``, ``sigma > 0``): the teacher step of
    consistency distillation (:mod:`diffusers_kit.objectives.consistency`). ``y``: labels."""
    process = model.process
    alpha_t, sigma_t = process.marginal(t.double())
    alpha_s, sigma_s = process.marginal(s.double())
    level_t, level_s = (expand((b / a).to(x.dtype), x) for a, b in ((alpha_t, sigma_t),
                                                                     (alpha_s, sigma_s)))
    a_t, a_s = expand(alpha_t.to(x.dtype), x), expand(alpha_s.to(x.dtype), x)
    y_t = x / a_t
    d = (y_t - model.predict(x, t.to(x.dtype), "x0", y)) / level_t
    step = level_s - level_t
    y_euler = y_t + step * d
    if method == "euler":
        return a_s * y_euler
    d_next = (y_euler - model.predict(a_s * y_euler, s.to(x.dtype), "x0", y)) / level_s
    return a_s * (y_t + 0.5 * step * (d + d_next))


def integrate_probability_flow(
    model: ScoreModel,
    x: Tensor,
    t_start: float,
    t_end: float,
    *,
    method: str = "RK45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eval: list[float] | None = None,
    field: Callable[[ScoreModel, Tensor, Tensor], Tensor] = probability_flow,
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Integrate the probability-flow ODE (``field``: :func:`probability_flow` or
    :func:`data_velocity`) from ``t_start`` to ``t_end`` (either direction).

    The batch is one system of ``x.numel()`` unknowns (scipy needs host float64 arrays).
    Returns the end point, the states at ``t_eval`` and their times.
    """
    shape, dtype, device = x.shape, x.dtype, x.device
    ones = torch.ones(shape[0], device=device, dtype=dtype)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        drift = field(model, state, ones * t)
        return drift.double().cpu().numpy().reshape(-1)

    from scipy.integrate import solve_ivp  # here: importing it costs every dkit command ~0.3 s

    y0 = x.detach().double().cpu().numpy().reshape(-1)
    solution = solve_ivp(rhs, (t_start, t_end), y0, method=method, rtol=rtol, atol=atol,
                         t_eval=t_eval)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
    states = [torch.from_numpy(solution.y[:, k]).to(device=device, dtype=dtype).reshape(shape)
              for k in range(solution.y.shape[1])] if t_eval is not None else []
    return end, states, list(solution.t) if t_eval is not None else []


@options
class ScipyODE(Solver):
    """The probability-flow ODE with ``scipy.integrate.solve_ivp`` (Song et al. 2021, sec. 4.3),
    in its data form (:func:`data_velocity`: defined from pure noise, ``alpha(1) = 0``, too).

    Args:
        method: RK45 (default), RK23, DOP853, Radau, BDF or LSODA.
        rtol: relative tolerance.
        atol: absolute tolerance.
        t_end: where to stop (default: the process's t_min).
        denoise: finish with Tweedie's x0_hat at t_end (one more evaluation).

    Recording (``record``) keeps x at ``snapshots`` evenly spaced times, and x0_hat at those
    times at one evaluation each (counted in nfe).
    """

    method: Method = "RK45"
    rtol: Annotated[float, Field(gt=0, le=1)] = 1e-5
    atol: Annotated[float, Field(gt=0, le=1)] = 1e-5
    t_end: Annotated[float, Field(ge=0, lt=1)] | None = None
    denoise: bool = True

    def settings(self) -> tuple:
        return (*super().settings(), self.record)  # recording sets the snapshot times

    def grid(self, process: NoiseProcess) -> ScipyGrid:
        t_end = process.t_min if self.t_end is None else self.t_end
        count = max(2, self.record.snapshots) if self.record is not None else 1
        return ScipyGrid([*np.linspace(1.0, t_end, count).tolist(), t_end][-count - 1:], t_end)

    def run(self, model: ScoreModel, x: Tensor, grid: ScipyGrid, noise: Noise,
            callback: Callback) -> Tensor:
        recording = len(grid.t) > 2
        x, states, times = integrate_probability_flow(
            model, x, 1.0, grid.t_end, method=self.method, rtol=self.rtol, atol=self.atol,
            t_eval=grid.t[:-1] if recording else None, field=data_velocity)
        for k, (state, time) in enumerate(zip(states, times, strict=True)):
            callback(k, state, model.predict(state, _full(state, time), "x0")
                     if callback.wants(k) else None)
        if not recording:
            callback(0, x)
        return model.predict(x, _full(x, grid.t_end), "x0") if self.denoise else x


@dataclass(frozen=True)
class ScipyGrid:
    """The recorded times of :class:`ScipyODE` (``[1, t_end]`` when nothing is recorded)."""

    t: list[float]
    t_end: float


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device)


def combine(x: Tensor, grid: TimeGrid, i: int, terms: list[Tensor], weights: list[float]
            ) -> Tensor:
    """The exponential-integrator step ``i`` in ``x`` (see the module doc): ``(sigma_{i+1} /
    sigma_i) x + alpha_{i+1} sum_k weights[k] terms[k]`` with the weights of the step in ``y =
    x / alpha`` on the data predictions ``terms`` (zero weights skipped): the one place the ODE
    solvers move ``x``."""
    alpha = grid.alpha[i + 1]
    out = x * grid.ratio(x)[i] if grid.sigma[i + 1] else None
    for weight, m in zip(weights, terms, strict=False):
        if weight:
            out = m * (alpha * weight) if out is None else out.add_(m, alpha=alpha * weight)
    return out if out is not None else torch.zeros_like(x)


class ODESolver(Solver):
    """What the fixed-step probability-flow solvers share: the grid (``steps``, ``spacing``,
    ``rho``; :func:`~diffusers_kit.solvers.grids.time_grid`) and the data prediction.

    ``clip_x0`` (None: off) clamps every data prediction ``x0_hat`` to ``[-clip_x0, clip_x0]``
    where :meth:`denoise` forms it, before any step uses it
    (:func:`~diffusers_kit.solvers.base.clip_data`, DPM-Solver++'s thresholding of the data
    prediction for pixel-space models; DDIM's ``clip_x0``).

    Args:
        spacing: ``auto`` (the process's ``default_spacing``), ``log_snr``, ``quadratic``,
            ``power``, ``edm`` (Karras et al. 2022), ``uniform``.
        rho: the exponent of the ``edm`` and ``power`` spacings.
        times: the ``steps`` evaluation times themselves, from 1 down (for example a grid
            tuned by :func:`~diffusers_kit.solvers.tuning.tune_times`); ``spacing`` and ``rho``
            are then unused. A discrete process's are snapped to its steps ``i / T``.
    """

    steps: int
    spacing: Spacing
    rho: float
    clip_x0: float | None = None
    times: list[float] | None = None

    def __post_init__(self) -> None:
        if self.times is not None:
            self.times = [float(t) for t in self.times]
            if len(self.times) != self.steps:
                raise OptionError("times", f"one time per step: {self.steps} of them (steps: "
                                  f"{self.steps}), or steps changed to match", self.times)
            check_times(self.times)

    def check(self, process: NoiseProcess) -> str | None:
        if self.times is not None:
            try:
                given_times(process, self.times)
            except ValueError as exc:
                return Unsuited(f"times that suit this process ({exc})", "times")
        return None

    def table(self, process: NoiseProcess) -> TimeGrid:
        """The grid's points."""
        return time_grid(process, self.steps, self.spacing, self.rho, self.times)

    def grid(self, process: NoiseProcess) -> Any:
        return self.table(process)

    def denoise(self, model: ScoreModel, x: Tensor, t: Tensor, grid: TimeGrid, i: int
                ) -> Tensor:
        """``x0_hat(x, t)`` at point ``i`` of ``grid``, clamped with ``clip_x0``: the one place
        these solvers form it."""
        return clip_data(model.predict(x, t, "x0", marginal=grid.marginal(i, x)), self.clip_x0)


@options
class EulerODE(ODESolver):
    """Euler's method for the probability-flow ODE in ``(x / alpha, sigma / alpha)`` (= DDIM),
    taken on ``x0_hat`` (:func:`combine` with ``w = [1 - r]``).

    Args:
        steps: number of steps (= network evaluations).
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] before each step (images in [-1, 1]:
            1.0; DDIM's option). None: off.
    """

    steps: Steps = 100
    spacing: Spacing = "auto"
    rho: Rho = 7.0
    clip_x0: ClipX0 = None
    times: Times = None

    def run(self, model: ScoreModel, x: Tensor, grid: TimeGrid, noise: Noise,
            callback: Callback) -> Tensor:
        times = grid.vectors(x.shape[0], x)
        for i in range(grid.steps):
            m = self.denoise(model, x, times[i], grid, i)
            callback(i, x, m)
            x = combine(x, grid, i, [m], [1.0 - grid.level[i + 1] / grid.level[i]])
        return x


def heun_weight(grid: TimeGrid, i: int) -> float:
    """``w = (r - 1) / h + 1`` of the bounded Heun step from point ``i`` (``h = lambda_{i+1} -
    lambda_i``, ``r = e^-h``; Lu et al. 2022's exponential-integrator weight for ``x0_hat``
    linear in lambda): ``x_{i+1} = x_euler + alpha_{i+1} w (m_{i+1} - m_i)``. It lies in [0, 1]
    (1 on an infinite step), the one place :class:`HeunODE` and :class:`EDMStochastic` form
    it."""
    h = grid.lam[i + 1] - grid.lam[i]
    return (grid.level[i + 1] / grid.level[i] - 1.0) / h + 1.0


def heun_step(solver: HeunODE | EDMStochastic, model: ScoreModel, x: Tensor, grid: TimeGrid,
              i: int, t: Tensor, t_next: Tensor | None, callback: Callback, step: int) -> Tensor:
    """One Heun step from point ``i`` of ``grid`` (evaluated at ``t``) to ``i + 1`` (at
    ``t_next``; None: the last step, an Euler step) in ``solver.form``, reported to the
    callback as step ``step``."""
    if solver.form == "data":
        m = solver.denoise(model, x, t, grid, i)
        callback(step, x, m)
        euler = combine(x, grid, i, [m], [1.0 - grid.level[i + 1] / grid.level[i]])
        if t_next is None:
            return euler
        w = grid.alpha[i + 1] * heun_weight(grid, i)
        m_next = solver.denoise(model, euler, t_next, grid, i + 1)
        return euler.add_(m_next, alpha=w).add_(m, alpha=-w)
    eps = model.predict(x, t, "eps", marginal=grid.marginal(i, x))  # the trapezoid in y = x/alpha
    alpha, level, delta = grid.alpha[i], grid.level[i], grid.level[i + 1] - grid.level[i]
    callback(step, x, x / alpha - level * eps if callback.wants(step) else None)
    euler = torch.add(x / alpha, eps, alpha=delta)
    if t_next is None:
        return euler * grid.alpha[i + 1]
    eps_next = model.predict(euler * grid.alpha[i + 1], t_next, "eps",
                             marginal=grid.marginal(i + 1, x))
    return torch.add(x / alpha, eps + eps_next, alpha=0.5 * delta) * grid.alpha[i + 1]


def needs_alpha(process: NoiseProcess, form: str) -> str | None:
    """Why the ``noise`` form cannot run on ``process`` (``alpha(1) = 0``), or None."""
    if form == "noise" and reaches_pure_noise(process):
        return "alpha > 0 on the whole path for form: noise (this process reaches alpha = 0); " \
               "use form: data"
    return None


@options
class HeunODE(ODESolver):
    """Heun's second-order method for the probability-flow ODE (Karras et al. 2022, Alg. 1).

    An Euler step to ``varsigma_{i+1}``, an evaluation there, a correction: ``form: data``
    (default) ``y_{i+1} = y_euler + w (m_{i+1} - m_i)`` on the x0 predictions
    (:func:`heun_weight`, ``w`` in [0, 1]: a long last step cannot blow up); ``form: noise``
    Karras et al.'s trapezoid ``y_{i+1} = y_i + (varsigma_{i+1} - varsigma_i) (eps_i +
    eps_{i+1}) / 2``. The last step is an Euler step.

    Args:
        steps: number of grid points; network evaluations are 2 * steps - 1.
        form: ``data`` (exponential-integrator correction) or ``noise`` (Karras et al.'s).
        clip_x0: clamp both x0 predictions of each step to [-clip_x0, clip_x0] (images in
            [-1, 1]: 1.0; DDIM's option); ``data`` form only. None: off.
    """

    steps: Steps = 18
    spacing: Spacing = "auto"
    rho: Rho = 7.0
    form: Literal["data", "noise"] = "data"
    clip_x0: ClipX0 = None
    times: Times = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_x0 is not None and self.form != "data":
            raise OptionError("clip_x0", "null with form: noise (clip_x0 clamps the x0 "
                              "predictions of the data form: use form: data)", self.clip_x0)

    def check(self, process: NoiseProcess) -> str | None:
        return needs_alpha(process, self.form) or super().check(process)

    def run(self, model: ScoreModel, x: Tensor, grid: TimeGrid, noise: Noise,
            callback: Callback) -> Tensor:
        times = grid.vectors(x.shape[0], x)
        last = grid.steps - 1
        for i in range(grid.steps):
            x = heun_step(self, model, x, grid, i, times[i], times[i + 1] if i < last else None,
                          callback, i)
        return x


@options
class EDMStochastic(ODESolver):
    """The EDM stochastic sampler (Karras et al. 2022, Algorithm 2): Heun steps with churn.

    Args:
        steps: number of grid points N; network evaluations are 2N - 1.
        S_churn: overall stochasticity; each step raises the noise by ``gamma = min(S_churn / N,
            sqrt(2) - 1)``. 0 is Heun's deterministic method.
        S_tmin: churn only where ``varsigma_i >= S_tmin``.
        S_tmax: churn only where ``varsigma_i <= S_tmax`` (and, always, where the raised level
            stays within the process's range ``varsigma(1)``).
        S_noise: scale of the added noise (the paper's 1.003 offsets a trained denoiser's bias;
            1 for an exact score).
        form: the Heun correction after the churn, :class:`HeunODE`'s ``data`` (default, from
            the raised level) or ``noise`` (the paper's). ``S_churn: 0`` is :class:`HeunODE`.
    """

    steps: Annotated[int, Field(ge=2, le=100_000)] = 40
    spacing: Spacing = "auto"
    rho: Rho = 7.0
    S_churn: Annotated[float, Field(ge=0, le=1e6)] = 30.0
    S_tmin: Annotated[float, Field(ge=0, le=1e6)] = 0.05
    S_tmax: Annotated[float, Field(gt=0, le=1e6)] = 50.0
    S_noise: Annotated[float, Field(gt=0, le=100)] = 1.0
    form: Literal["data", "noise"] = "data"
    times: Times = None

    def check(self, process: NoiseProcess) -> str | None:
        return needs_alpha(process, self.form) or super().check(process)

    def grid(self, process: NoiseProcess) -> EDMGrid:
        """Per step: ``gamma_i`` and the grid of the Heun step from the raised level
        ``varsigma_hat = (1 + gamma_i) varsigma_i`` (its time by the log-SNR's inverse) to
        ``varsigma_{i+1}``; the added noise's std in ``x`` at the raised point,
        ``alpha_hat S_noise sqrt(varsigma_hat^2 - varsigma_i^2)``."""
        points = self.table(process)
        level = torch.tensor(points.level[:-1], dtype=torch.float64)
        n, top = points.steps, points.level[0]
        gamma = torch.where((level >= self.S_tmin) & (level <= self.S_tmax),
                            min(self.S_churn / n, math.sqrt(2.0) - 1.0), 0.0)
        gamma = torch.where(level * (1.0 + gamma) <= top * (1 + 1e-12), gamma, 0.0)
        raised = level * (1.0 + gamma)
        t = torch.where(gamma > 0, time_of_log_snr(process, -2.0 * torch.log(raised),
                                                   points.t[n - 1], 1.0), points.times[:-1])
        alpha, sigma = process.marginal(t)
        moves = []
        for i in range(n):
            if gamma[i] == 0:
                moves.append(None)
                continue
            j = slice(i + 1, i + 2)
            moves.append(TimeGrid(torch.stack([t[i], points.times[i + 1]]),
                                  [float(t[i]), *points.t[j]], [float(alpha[i]), *points.alpha[j]],
                                  [float(sigma[i]), *points.sigma[j]],
                                  [float(raised[i]), *points.level[j]],
                                  [-math.log(raised[i]), *points.lam[j]]))
        std = (self.S_noise * alpha * (raised**2 - level**2).clamp_min(0).sqrt()).tolist()
        return EDMGrid(points, moves, std, [float(a / b) for a, b in
                                            zip(alpha, points.alpha, strict=False)])

    def run(self, model: ScoreModel, x: Tensor, grid: EDMGrid, noise: Noise,
            callback: Callback) -> Tensor:
        points = grid.table
        times, last = points.vectors(x.shape[0], x), points.steps - 1
        for i in range(points.steps):
            t_next = times[i + 1] if i < last else None
            move = grid.churned[i]
            if move is None:
                x = heun_step(self, model, x, points, i, times[i], t_next, callback, i)
                continue
            x = torch.add(x * grid.scale[i], noise.randn_like(x), alpha=grid.std[i])
            t = torch.full_like(times[i], move.t[0])
            x = heun_step(self, model, x, move, 0, t, t_next, callback, i)
        return x


@dataclass(frozen=True)
class EDMGrid(OnGrid):
    """:class:`EDMStochastic`'s grid: the points, per step the raised move (None: no churn),
    the std of the added noise in ``x`` and the factor ``alpha_hat / alpha_i`` on ``x``."""

    churned: list[TimeGrid | None]
    std: list[float]
    scale: list[float]


#: ``lower_order_final`` lowers the final orders of grids with fewer points than this.
LOWER_ORDER_FINAL_BELOW = 15


def usable_orders(steps: int, order: int, lower_order_final: bool,
                  from_pure_noise: bool = False) -> list[int]:
    """The order of each step of DPM-Solver++(kM) and UniPC (the one place it is decided): as
    many past predictions as there are, up to ``order`` (from pure noise, ``lambda_0 = -inf``,
    the first prediction stays out of the differences in lambda); first order onto ``varsigma
    = 0`` (``h = inf``); with ``lower_order_final`` below :data:`LOWER_ORDER_FINAL_BELOW` steps,
    at most the steps left to ``varsigma_min``, ``min(order, i + 1, steps - 1 - i)`` (the
    reference implementations' rule, their final denoising step counted apart; diffusers ends
    the staircase one step later: ``docs/solvers.md``)."""
    lower = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    usable = []
    for i in range(steps):
        k = min(order, max(1, i) if from_pure_noise else i + 1)
        if i == steps - 1:
            k = 1
        elif lower:
            k = min(k, steps - 1 - i)
        usable.append(k)
    return usable


def multistep_weights(lam: list[float], order: int, lower_order_final: bool) -> list[UniStep]:
    """Per step of DPM-Solver++(kM) (see the module doc): ``y_{i+1} = r y_i + sum_j w_j m_j``
    over the x0 predictions ``m_j`` made ``j`` steps ago (``predictor = [w_0, w_1, ...]``).

    ``lam`` holds ``lambda`` at the grid points (``inf`` at the final ``varsigma = 0``).
    """
    steps = len(lam) - 1
    weights = []
    for i, usable in enumerate(usable_orders(steps, order, lower_order_final,
                                             math.isinf(lam[0]))):
        if usable == 1:
            r = 0.0 if i == steps - 1 else math.exp(-(lam[i + 1] - lam[i]))
            weights.append(UniStep(r, [1.0 - r]))
            continue
        h = lam[i + 1] - lam[i]
        r = math.exp(-h)
        r0 = (lam[i] - lam[i - 1]) / h
        d0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m_0 - m_1) / r_0
        if usable == 2:
            w = [1.0 - r, 0.0, 0.0]
            w = [a + (1.0 - r) * 0.5 * b for a, b in zip(w, d0, strict=True)]
            weights.append(UniStep(r, w[:2]))
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1 = [0.0, 1.0 / r1, -1.0 / r1]  # (m_1 - m_2) / r_1
        diff = [a - b for a, b in zip(d0, d1, strict=True)]
        big_d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d0, diff, strict=True)]
        big_d2 = [b / (r0 + r1) for b in diff]
        c1, c2 = (r - 1.0) / h + 1.0, 2.0 * ((r - 1.0 + h) / h**2 - 0.5)
        w = [(1.0 - r) * (j == 0) + c1 * a - c2 * b for j, (a, b) in
             enumerate(zip(big_d1, big_d2, strict=True))]
        weights.append(UniStep(r, w))
    return weights


@dataclass(frozen=True)
class UniStep:
    """One multistep step: the predictor ``y_{i+1} = r y_i + sum_k predictor[k] m_k`` and,
    when the step is corrected (UniPC), ``y_{i+1} = r y_i + corrector[0] m_new + sum_k
    corrector[k + 1] m_k`` (``m_k``: the data prediction made ``k`` steps before step ``i``'s)."""

    r: float
    predictor: list[float]
    corrector: list[float] | None = None


@dataclass(frozen=True)
class MultistepGrid(OnGrid):
    """A multistep solver's grid: the points and each step's :class:`UniStep`."""

    plan: list[UniStep]


class Multistep(ODESolver):
    r"""The loop of the multistep solvers (DPM-Solver++(kM), UniPC): one data prediction per
    step; :func:`combine` weighs the last ``order`` of them with the plan's weights; a
    corrector (UniC) first takes the previous step again with the new prediction."""

    order: int
    lower_order_final: bool

    def plan(self, lam: list[float]) -> list[UniStep]:
        return multistep_weights(lam, self.order, self.lower_order_final)

    def grid(self, process: NoiseProcess) -> MultistepGrid:
        table = self.table(process)
        return MultistepGrid(table, self.plan(table.lam))

    def run(self, model: ScoreModel, x: Tensor, grid: MultistepGrid, noise: Noise,
            callback: Callback) -> Tensor:
        points, plan, history = grid.table, grid.plan, []
        times = points.vectors(x.shape[0], x)
        start = x
        for i in range(points.steps):
            m = self.denoise(model, x, times[i], points, i)
            callback(i, x, m)
            corrector = plan[i - 1].corrector if i > 0 else None
            if corrector is not None:  # UniC: step i - 1 again, with m as one more point
                x = combine(start, points, i - 1, [m, *history], corrector)
            history, start = [m, *history][:self.order], x
            x = combine(x, points, i, history, plan[i].predictor)
        return x


@options
class DPMSolver2M(Multistep):
    """DPM-Solver++(2M): the second-order multistep solver in log-SNR (Lu et al. 2022, Alg. 2;
    the module doc); one evaluation per step.

    Args:
        steps: number of steps (= network evaluations).
        lower_order_final: below 15 steps, no step of a higher order than the steps left to
            varsigma_min allow (:func:`usable_orders`).
        clip_x0: clamp every x0 prediction to [-clip_x0, clip_x0] before it enters the
            update (DPM-Solver++'s thresholding; images in [-1, 1]: 1.0). None: off.
    """

    order = 2

    steps: Steps = 20
    spacing: Spacing = "auto"
    rho: Rho = 7.0
    lower_order_final: bool = True
    clip_x0: ClipX0 = None
    times: Times = None


class DPMSolver3M(DPMSolver2M):
    """DPM-Solver++(3M): the third-order multistep solver in log-SNR (Lu et al. 2022; the module
    doc, whose ``D_2`` weight departs from the reference code's); one evaluation per step.
    Its arguments are :class:`DPMSolver2M`'s.

    Args:
        lower_order_final: below 15 steps, no step of a higher order than the steps left to
            varsigma_min allow (:func:`usable_orders`; at 5 steps 2M's). Off: third order
            once the history allows.
    """

    order = 3

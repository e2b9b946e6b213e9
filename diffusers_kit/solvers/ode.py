"""Probability-flow ODE samplers (Song et al. 2021, eq. 13): adaptive scipy and fixed-step torch.

The probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 grad log q_t(x) / 2`` shares every marginal
with the forward SDE. ``ScipyODE`` integrates it as given, the whole batch as one flattened system,
with any of ``scipy.integrate.solve_ivp``'s methods.

The torch solvers run wholly on the device and use the change of variables of DDIM / EDM
(Song et al. 2021a, eq. 14; Karras et al. 2022, eq. 4): with ``y = x / alpha`` and the noise level
``varsigma = sigma / alpha``, for every process with marginal ``x_t = alpha x0 + sigma eps`` the
ODE becomes::

    dy / d varsigma = eps_hat(alpha y, t(varsigma)),      x0_hat = y - varsigma eps_hat

* ``euler``: one Euler step per grid interval (equals DDIM with eta = 0);
* ``heun``: Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), an Euler
  step for the last interval, so N steps cost 2N - 1 evaluations; by default its correction is
  taken on the x0 predictions in exponential-integrator form (bounded weights; see the class);
* ``edm_stochastic``: Karras et al. 2022, Algorithm 2: before each Heun step the noise level is
  raised from ``varsigma_i`` to ``varsigma_hat = (1 + gamma_i) varsigma_i`` by adding fresh noise
  of variance ``varsigma_hat^2 - varsigma_i^2`` (times ``S_noise^2``), with
  ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` on ``S_tmin <= varsigma_i <= S_tmax``; the Heun
  step from the raised level takes ``heun``'s ``form`` (``data`` by default);
* ``dpm_solver_2m`` / ``dpm_solver_3m``: the multistep DPM-Solver++ in log-SNR
  (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order multistep form). With
  ``lambda = -log varsigma``, ``h = lambda_{i+1} - lambda_i``, ``r = varsigma_{i+1} / varsigma_i
  = e^-h`` and the last x0 predictions ``m_0, m_1, m_2`` (``r_0 = h_{i-1} / h``,
  ``r_1 = h_{i-2} / h``)::

      y_{i+1} = r y_i + (1 - r) D_0 + ((r - 1) / h + 1) D_1 - 2 ((r - 1 + h) / h^2 - 1/2) D_2
      D_0 = m_0,   d_0 = (m_0 - m_1) / r_0,   d_1 = (m_1 - m_2) / r_1
      order 2: D_1 = d_0 / 2 ... written as y_{i+1} = r y_i + (1 - r)(m_0 + d_0 / 2), D_2 = 0
      order 3: D_1 = d_0 + r_0 / (r_0 + r_1) (d_0 - d_1),  D_2 = (d_0 - d_1) / (r_0 + r_1)

  ``D_1`` approximates ``h m'`` and ``D_2`` approximates ``h^2 m'' / 2`` (derivatives in
  ``lambda``), so the exponential integrator's ``h^3 phi_3`` term of the data prediction's
  Taylor expansion weighs ``D_2`` by ``2 ((r - 1 + h) / h^2 - 1/2)``. The DPM-Solver reference
  code (and diffusers, which follows it) uses half that weight, which leaves the order-3 step
  second order; here the weight is the expansion's, and a test fits the convergence slope.

  The first steps use the orders their history allows; the last step (onto ``varsigma = 0``,
  ``h = inf``) is first order, ``y = m_0``. With ``lower_order_final`` and fewer than 15 steps
  the steps before it take no higher an order than the steps left to ``varsigma_min`` allow:
  the step into ``varsigma_min`` first order, the one before it at most second, and so on
  (:func:`usable_orders`; the rule of the DPM-Solver++ and UniPC reference implementations, which
  count the final denoising step apart; a higher-order step there extrapolates the x0
  predictions with large weights over long steps).

The default grid (``spacing: auto``) is the process's ``default_spacing``: DDIM's ``quadratic``
grid in ``t`` (DPM-Solver's "time_quadratic") on DDPM, VP and sub-VP, where it is the more
accurate at 5-20 NFE, and equal steps in log-SNR (``log_snr``) on VE, OU and the rest, where
the quadratic grid is the less accurate (see ``UniPC``'s ``spacing`` and ``docs/solvers.md``);
the EDM grid (rho = 7, Karras et al. 2022) suits data in [-1, 1].
Every grid ends at ``varsigma = 0``: the last step lands on the denoised estimate without an
extra evaluation.
``steps`` counts grid points; ``nfe`` in the result is the true number of evaluations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.integrate import solve_ivp

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
from diffusers_kit.solvers.grids import Spacing, cached, time_of_log_snr
from diffusers_kit.solvers.noise import Noise, as_noise
from diffusers_kit.solvers.tables import ODETable, ode_table, scalars

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor
Method = Literal["RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"]


def probability_flow(model: ScoreModel, x: Tensor, t: Tensor) -> Tensor:
    """``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` with the model's score."""
    return model.process.probability_flow_drift(x, t.to(x.dtype), model.score(x, t))


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
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Integrate the probability-flow ODE from ``t_start`` to ``t_end`` (either direction).

    The batch is one system of ``x.numel()`` unknowns (scipy needs host float64 arrays).
    Returns the end point, the states at ``t_eval`` and their times.
    """
    shape, dtype, device = x.shape, x.dtype, x.device
    ones = torch.ones(shape[0], device=device, dtype=dtype)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        drift = probability_flow(model, state, ones * t)
        return drift.double().cpu().numpy().reshape(-1)

    y0 = x.detach().double().cpu().numpy().reshape(-1)
    solution = solve_ivp(rhs, (t_start, t_end), y0, method=method, rtol=rtol, atol=atol,
                         t_eval=t_eval)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
    states = [torch.from_numpy(solution.y[:, k]).to(device=device, dtype=dtype).reshape(shape)
              for k in range(solution.y.shape[1])] if t_eval is not None else []
    return end, states, list(solution.t) if t_eval is not None else []


class ScipyODE(Solver):
    """The probability-flow ODE with ``scipy.integrate.solve_ivp`` (Song et al. 2021, sec. 4.3).

    Args:
        method: RK45 (default), RK23, DOP853, Radau, BDF or LSODA.
        rtol: relative tolerance.
        atol: absolute tolerance.
        t_end: where to stop (default: the process's t_min).
        denoise: finish with Tweedie's x0_hat at t_end (one more evaluation).

    Recording (``record``) keeps x at ``snapshots`` evenly spaced times, and x0_hat at those
    times at one evaluation each (counted in nfe).
    """

    def __init__(
        self,
        method: Method = "RK45",
        rtol: Annotated[float, Field(gt=0, le=1)] = 1e-5,
        atol: Annotated[float, Field(gt=0, le=1)] = 1e-5,
        t_end: Annotated[float, Field(ge=0, lt=1)] | None = None,
        denoise: bool = True,
    ) -> None:
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.t_end = t_end
        self.denoise = denoise

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
        t_end = process.t_min if self.t_end is None else self.t_end
        begin = model.nfe
        x = start(model, shape, as_noise(generator, noise), x_T)
        snapshots = max(2, self.record.snapshots) if self.record is not None else 0
        t_eval = list(np.linspace(1.0, t_end, snapshots)) if self.record is not None else None
        x, states, times = integrate_probability_flow(model, x, 1.0, t_end, method=self.method,
                                                      rtol=self.rtol, atol=self.atol,
                                                      t_eval=t_eval)
        trajectory = states if self.keep_trajectory else []
        x0_predictions = []
        if self.keep_x0:
            for state, time in zip(states, times, strict=True):
                t = torch.full((shape[0],), time, device=device)
                x0_predictions.append(model.predict(state, t, "x0"))
        if self.denoise:
            x = model.predict(x, torch.full((shape[0],), t_end, device=device), "x0")
        if progress is not None:
            progress(1)
        return SampleResult(x, model.nfe - begin, trajectory, x0_predictions, times)



class _FixedStepODE(Solver):
    """Shared set-up of the torch-native probability-flow ODE solvers (see the module doc).

    ``clip_x0`` (None: off) clamps every data prediction ``x0_hat = y - varsigma eps_hat`` to
    ``[-clip_x0, clip_x0]`` where :meth:`data` forms it, before any step uses it
    (:func:`~diffusers_kit.solvers.base.clip_data`, DPM-Solver++'s thresholding of the data
    prediction for pixel-space models; DDIM's ``clip_x0``). The solvers stepping on ``x0_hat``
    (DPM-Solver++, UniPC) take it as it is; ``euler`` and ``heun`` take their steps in the
    same data form when it is set.
    """

    def __init__(self, steps: int, spacing: Spacing, rho: float,
                 clip_x0: float | None = None) -> None:
        self.steps = steps
        self.spacing = spacing
        self.rho = rho
        self.clip_x0 = clip_x0

    def table(self, process: NoiseProcess) -> ODETable:
        return ode_table(process, self.steps, self.spacing, self.rho)

    def total_steps(self, process: NoiseProcess) -> int:
        return self.table(process).steps

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
        noise = as_noise(generator, noise)
        table = self.table(process)
        steps, rows = table.steps, table.rows
        recorder = Recorder(steps, self.record, rows["t"][:-1])
        begin = model.nfe
        y = start(model, shape, noise, x_T, device=device) * (1.0 / rows["alpha"][0])
        times = table.time_vectors(process, shape[0], device)
        alpha = scalars(process, ("ode_alpha", self.steps, self.spacing, float(self.rho)),
                        lambda: rows["alpha"], y.device, y.dtype)
        state: dict = {"noise": noise, "times": times, "alpha": alpha}
        self.prepare(process, state)
        for i in range(steps):
            y = self.step(model, y, rows, i, steps, state, recorder)
            if progress is not None:
                progress(1)
        return recorder.result(rows["alpha"][-1] * y, model.nfe - begin)

    def prepare(self, process: NoiseProcess, state: dict) -> None:
        """Per-call set-up before the loop: put the cached tables of weights the steps read
        into ``state`` (which holds ``noise``, the time vectors ``times`` and the 0-dim
        ``alpha`` scalars, whose device and dtype are the state's); nothing by default."""

    @staticmethod
    def eps(model: ScoreModel, y: Tensor, t: Tensor, alpha: float | Tensor) -> Tensor:
        """``eps_hat(alpha y, t)`` (``alpha``: a float or a cached 0-dim tensor,
        ``state["alpha"][i]``)."""
        return model.predict(y * alpha, t, "eps")

    def data(self, model: ScoreModel, y: Tensor, rows: dict[str, list[float]], i: int,
             state: dict) -> Tensor:
        """``x0_hat = y - varsigma_i eps_hat(alpha_i y, t_i)`` (one network evaluation), clamped
        to ``[-clip_x0, clip_x0]`` when ``clip_x0`` is set: the one place the fixed-step ODE
        solvers form the data prediction."""
        eps = self.eps(model, y, state["times"][i], state["alpha"][i])
        return clip_data(torch.add(y, eps, alpha=-rows["level"][i]), self.clip_x0)

    def denoised(self, model: ScoreModel, y: Tensor, rows: dict[str, list[float]], i: int,
                 state: dict, recorder: Recorder) -> Tensor:
        """:meth:`data` at step ``i`` (``x0_hat`` in ``y`` units, clamped with ``clip_x0``),
        recorded when the recorder asks."""
        x0 = self.data(model, y, rows, i, state)
        if recorder.wants(i):
            recorder.record(i, rows["alpha"][i] * y, rows["alpha"][-1] * x0)
        return x0

    def step(self, model: ScoreModel, y: Tensor, rows: dict[str, list[float]], i: int,
             steps: int, state: dict, recorder: Recorder) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def record_step(recorder: Recorder, i: int, y: Tensor, eps: Tensor,
                    rows: dict[str, list[float]]) -> None:
        x0 = rows["alpha"][-1] * (y - rows["level"][i] * eps)
        recorder.record(i, rows["alpha"][i] * y, x0)


class EulerODE(_FixedStepODE):
    """Euler's method for the probability-flow ODE in ``(x / alpha, sigma / alpha)`` (= DDIM).

    Args:
        steps: number of steps (= network evaluations).
        spacing: ``auto`` (default: the process's ``default_spacing``, ``quadratic`` on DDPM / VP /
            sub-VP, ``log_snr`` elsewhere), ``log_snr``, ``quadratic``, ``edm`` (Karras et al.
            2022), ``uniform``.
        rho: the exponent of the ``edm`` spacing.
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] before each step (images in [-1, 1]:
            1.0; DDIM's option). The step is then taken in its data form, ``y_{i+1} = r y_i +
            (1 - r) x0_hat`` (``r = varsigma_{i+1} / varsigma_i``; the same step). None: off.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 100,
        spacing: Spacing = "auto",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        clip_x0: ClipX0 = None,
    ) -> None:
        super().__init__(steps, spacing, rho, clip_x0)

    def step(self, model, y, rows, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        if self.clip_x0 is not None:
            x0 = self.denoised(model, y, rows, i, state, recorder)
            r = rows["level"][i + 1] / rows["level"][i]
            return mix(r, r, y, [x0], [1.0 - r])
        eps = self.eps(model, y, state["times"][i], state["alpha"][i])
        if recorder.wants(i):
            self.record_step(recorder, i, y, eps, rows)
        return torch.add(y, eps, alpha=rows["level"][i + 1] - rows["level"][i])


def heun_data_weights(level: float, level_next: float, h: float) -> tuple[float, float, float]:
    """One Heun step in the ``data`` form from noise level ``level`` to ``level_next > 0``
    (``h = log(level / level_next)``, the log-SNR step in ``lambda = -log varsigma``): ``(a, b,
    w)`` with ``y' = y + a eps + b eps'`` (``eps'`` evaluated at the Euler point ``y + (level' -
    level) eps``). It is ``euler + w (m' - m)`` on the x0 predictions ``m = y - level eps``, ``m'
    = euler - level' eps'`` with ``w = (r - 1) / h + 1``, ``r = level' / level = e^-h`` (the
    exponential integrator's weight for ``m`` linear in lambda; Lu et al. 2022), which expands to
    ``a = (1 + w) (level' - level) + w level``, ``b = -w level'``. ``w`` lies in [0, 1]: the
    one place the bounded Heun step of :class:`HeunODE` and :class:`EDMStochastic` is formed."""
    delta = level_next - level
    weight = (level_next / level - 1.0) / h + 1.0
    return (1.0 + weight) * delta + weight * level, -weight * level_next, weight


class HeunODE(_FixedStepODE):
    """Heun's second-order method for the probability-flow ODE (Karras et al. 2022, Alg. 1).

    Each step takes an Euler (DDIM) step to ``varsigma_{i+1}``, evaluates there, and corrects.
    ``form: data`` (default) corrects in the exponential-integrator form on the x0 predictions,
    ``y_{i+1} = y_euler + ((r - 1) / h + 1) (m_{i+1} - m_i)`` (``r = varsigma_{i+1} /
    varsigma_i = e^-h``; second order, as Lu et al. 2022's DPM-Solver++ with the endpoint as
    its intermediate point): its weights lie in [0, 1], so a long last step into
    ``varsigma_min`` cannot blow up. ``form: noise`` is Karras et al.'s trapezoid on ``eps``,
    ``y_{i+1} = y_i + (varsigma_{i+1} - varsigma_i) (eps_i + eps_{i+1}) / 2``, which at few
    steps multiplies a large ``eps`` at ``varsigma_min`` by the whole step (it diverged at 5 NFE).

    Args:
        steps: number of grid points; network evaluations are 2 * steps - 1.
        spacing: ``auto`` (default: the process's ``default_spacing``, ``quadratic`` on DDPM / VP /
            sub-VP, ``log_snr`` elsewhere), ``log_snr``, ``quadratic``, ``edm`` (Karras et al.
            2022), ``uniform``.
        rho: the exponent of the ``edm`` spacing.
        form: ``data`` (exponential-integrator correction) or ``noise`` (Karras et al.'s).
        clip_x0: clamp both x0 predictions of each step to [-clip_x0, clip_x0] (images in
            [-1, 1]: 1.0; DDIM's option), the step then written on them, ``y_euler = r y_i +
            (1 - r) m_i``, ``y_{i+1} = y_euler + w (m_{i+1} - m_i)`` (the same step); ``data``
            form only. None: off.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 18,
        spacing: Spacing = "auto",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        form: Literal["data", "noise"] = "data",
        clip_x0: ClipX0 = None,
    ) -> None:
        if clip_x0 is not None and form != "data":
            raise ValueError("clip_x0 clamps the x0 predictions of the data form: "
                             "use form: data")
        super().__init__(steps, spacing, rho, clip_x0)
        self.form = form

    def weights(self, process: NoiseProcess) -> list[tuple[float, float, float]]:
        """The ``data`` form's step, cached with the grid: ``(a, b, w)`` with ``y_{i+1} = y_i +
        a eps_i + b eps_{i+1}`` (``eps_{i+1}`` evaluated at the Euler point): ``euler + w
        ((euler - level' eps_{i+1}) - (y - level eps_i))`` with ``euler = y + (level' - level)
        eps_i`` and ``w = (r - 1) / h + 1`` expands to ``a = (1 + w) (level' - level) + w
        level``, ``b = -w level'`` (``w`` itself: the step on clamped x0 predictions)."""

        def build() -> list[tuple[float, float, float]]:
            rows = self.table(process).rows
            return [heun_data_weights(rows["level"][i], rows["level"][i + 1],
                                      rows["lam"][i + 1] - rows["lam"][i])
                    for i in range(len(rows["level"]) - 2)]

        return cached(process, ("heun_weights", self.steps, self.spacing, float(self.rho)),
                      build)

    def prepare(self, process: NoiseProcess, state: dict) -> None:
        state["weights"] = self.weights(process)

    def step(self, model, y, rows, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        if self.clip_x0 is not None:
            return self.clipped_step(model, y, rows, i, steps, state, recorder)
        times, alpha = state["times"], state["alpha"]
        eps = self.eps(model, y, times[i], alpha[i])
        if recorder.wants(i):
            self.record_step(recorder, i, y, eps, rows)
        euler = torch.add(y, eps, alpha=rows["level"][i + 1] - rows["level"][i])
        if i == steps - 1:
            return euler
        eps_next = self.eps(model, euler, times[i + 1], alpha[i + 1])
        if self.form == "noise":
            return torch.add(y, eps + eps_next,
                             alpha=0.5 * (rows["level"][i + 1] - rows["level"][i]))
        a, b, _ = state["weights"][i]
        return torch.add(y, eps, alpha=a).add_(eps_next, alpha=b)

    def clipped_step(self, model, y, rows, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        """The ``data`` form's step on clamped x0 predictions (``clip_x0``): ``y_euler = r y +
        (1 - r) m_i``, ``y_{i+1} = y_euler + w (m_{i+1} - m_i)``, ``w = (r - 1) / h + 1``."""
        m = self.denoised(model, y, rows, i, state, recorder)
        r = rows["level"][i + 1] / rows["level"][i]
        euler = mix(r, r, y, [m], [1.0 - r])
        if i == steps - 1:
            return euler
        w = state["weights"][i][2]
        m_next = self.data(model, euler, rows, i + 1, state)
        return euler.add_(m_next, alpha=w).add_(m, alpha=-w)


class EDMStochastic(_FixedStepODE):
    """The EDM stochastic sampler (Karras et al. 2022, Algorithm 2): Heun steps with churn.

    Args:
        steps: number of grid points N; network evaluations are 2N - 1.
        spacing: ``auto`` (default: the process's ``default_spacing``, ``quadratic`` on DDPM / VP /
            sub-VP, ``log_snr`` elsewhere), ``log_snr``, ``quadratic``, ``edm`` (the paper's),
            ``uniform``.
        rho: the exponent of the ``edm`` spacing.
        S_churn: overall stochasticity; each step raises the noise by ``gamma = min(S_churn / N,
            sqrt(2) - 1)``. 0 is Heun's deterministic method.
        S_tmin: churn only where ``varsigma_i >= S_tmin``.
        S_tmax: churn only where ``varsigma_i <= S_tmax`` (and, always, where the raised level
            stays within the process's range ``varsigma(1)``).
        S_noise: scale of the added noise (the paper's 1.003 offsets a trained denoiser's bias;
            1 for an exact score).
        form: the Heun correction after the churn, as :class:`HeunODE`'s: ``data`` (default)
            on the x0 predictions with bounded weights (:func:`heun_data_weights`, from the
            raised level), or ``noise``, the paper's trapezoid on ``eps``. On the paper's grid
            (rho = 7, small last steps) they agree; with few steps on other grids the trapezoid
            multiplies the ``eps`` evaluated near ``varsigma_min`` by a long step: 10 steps on
            the cosine-schedule DDPM gave 366x the SWD floor on the exact-score mixture (8.7x
            on equal log-SNR steps), the data form 1.2x (2.6x). With ``S_churn: 0`` each form
            is :class:`HeunODE`'s, sample for sample.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=2, le=100_000)] = 40,
        spacing: Spacing = "auto",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        S_churn: Annotated[float, Field(ge=0, le=1e6)] = 30.0,
        S_tmin: Annotated[float, Field(ge=0, le=1e6)] = 0.05,
        S_tmax: Annotated[float, Field(gt=0, le=1e6)] = 50.0,
        S_noise: Annotated[float, Field(gt=0, le=100)] = 1.0,
        form: Literal["data", "noise"] = "data",
    ) -> None:
        super().__init__(steps, spacing, rho)
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = S_churn, S_tmin, S_tmax, S_noise
        self.form = form

    def churn(self, process: NoiseProcess) -> dict[str, list[float]]:
        """Per step: the raised level ``varsigma_hat``, its time and ``alpha``, and the std of
        the added noise in ``y`` units (cached with the grid)."""
        key = ("edm_churn", self.steps, self.spacing, float(self.rho), self.S_churn,
               self.S_tmin, self.S_tmax, self.S_noise)

        def build() -> dict[str, list[float]]:
            table = self.table(process)
            level, n = table.level[:-1], table.steps
            top = float(table.level[0])
            gamma = torch.where((level >= self.S_tmin) & (level <= self.S_tmax),
                                min(self.S_churn / n, math.sqrt(2.0) - 1.0), 0.0)
            raised = level * (1.0 + gamma)
            gamma = torch.where(raised <= top * (1 + 1e-12), gamma, torch.zeros_like(gamma))
            raised = level * (1.0 + gamma)
            t_min = float(table.times[n - 1])
            times = torch.where(gamma > 0, time_of_log_snr(process, -2.0 * torch.log(raised),
                                                           t_min, 1.0), table.times[:-1])
            following = table.level[1:]
            heun = [heun_data_weights(float(a), float(b), float(torch.log(a / b)))
                    for a, b in zip(raised[:-1], following[:-1], strict=True)]
            return {"level": raised.tolist(), "t": times.tolist(),
                    "alpha": process.alpha(times).tolist(),
                    "std": (self.S_noise * (raised**2 - level**2).clamp_min(0).sqrt()).tolist(),
                    "gamma": gamma.tolist(), "heun": heun}

        return cached(process, key, build)

    def sample(self, model, shape, **kwargs):  # type: ignore[no-untyped-def,override]
        self._churn = self.churn(model.process)
        return super().sample(model, shape, **kwargs)

    def churned(self, process: NoiseProcess, state: dict, i: int) -> tuple[Tensor, Tensor]:
        """The time vector and 0-dim ``alpha`` at step ``i``'s raised level (cached per batch
        size, device and dtype, as the grid's own)."""
        times, alpha = state["times"], state["alpha"]
        key = ("edm_churned", self.steps, self.spacing, float(self.rho), self.S_churn,
               self.S_tmin, self.S_tmax, self.S_noise)
        churn = self._churn

        def build() -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
            return (tuple(torch.full_like(t, c) for t, c in zip(times, churn["t"], strict=False)),
                    tuple(torch.full_like(a, c) for a, c in zip(alpha, churn["alpha"],
                                                                strict=False)))

        vectors, alphas = cached(process, (*key, len(times[0]), str(times[0].device),
                                           alpha[0].dtype), build)
        return vectors[i], alphas[i]

    def step(self, model, y, rows, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        churn, times = self._churn, state["times"]
        if churn["gamma"][i] > 0:
            y = torch.add(y, state["noise"].randn_like(y),
                          alpha=churn["std"][i])
            t, alpha = self.churned(model.process, state, i)
        else:
            t, alpha = times[i], state["alpha"][i]
        level = churn["level"][i]
        eps = self.eps(model, y, t, alpha)
        if recorder.wants(i):
            recorder.record(i, churn["alpha"][i] * y, rows["alpha"][-1] * (y - level * eps))
        delta = rows["level"][i + 1] - level
        euler = torch.add(y, eps, alpha=delta)
        if i == steps - 1:
            return euler
        eps_next = self.eps(model, euler, times[i + 1], state["alpha"][i + 1])
        if self.form == "noise":
            return torch.add(y, eps + eps_next, alpha=0.5 * delta)
        a, b, _ = churn["heun"][i]
        return torch.add(y, eps, alpha=a).add_(eps_next, alpha=b)


#: ``lower_order_final`` lowers the final orders of grids with fewer points than this.
LOWER_ORDER_FINAL_BELOW = 15


def usable_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order each step of a multistep solver uses (the one place the order schedule of
    DPM-Solver++(kM) and UniPC is decided): as many past predictions as there are (up to
    ``order``); first order for the last step, onto ``varsigma = 0`` (``h = inf``: ``y =
    m_0``); and, with ``lower_order_final`` below :data:`LOWER_ORDER_FINAL_BELOW` steps, at
    most the number of steps left to ``varsigma_min``: step ``i < steps - 1`` uses
    ``min(order, i + 1, steps - 1 - i)``, so the step into ``varsigma_min`` is first order and
    the one before it at most second (the reference implementations' ``lower_order_final``,
    ``min(order, steps + 1 - step)`` over the steps to ``t_eps``, their final denoising step
    counted apart). For order 2 this is DPM-Solver++(2M)'s first-order step into
    ``varsigma_min``; at 5 steps order 3 is order 2's ``[1, 2, 2, 1, 1]``.

    diffusers counts the step onto ``varsigma = 0`` as the last and so ends the staircase one
    step later (``[1, 2, 3, 2, 1]`` at 5 steps): on the exact-score mixture (DDPM, log-SNR grid)
    that made DPM-Solver++(3M) at 5 NFE worse than DDIM (error to the exact ODE 0.356 against
    0.345; 0.236 with this rule)."""
    lower = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    usable = []
    for i in range(steps):
        k = min(order, i + 1)
        if i == steps - 1:
            k = 1
        elif lower:
            k = min(k, steps - 1 - i)
        usable.append(k)
    return usable


def multistep_weights(lam: list[float], order: int, lower_order_final: bool
                      ) -> list[tuple[float, list[float]]]:
    """Per step of DPM-Solver++(kM) (see the module doc): ``(r, [w_0, w_1, ...])`` with
    ``y_{i+1} = r y_i + sum_j w_j m_j`` over the x0 predictions ``m_j`` made ``j`` steps ago.

    ``lam`` holds ``lambda`` at the grid points (``inf`` at the final ``varsigma = 0``).
    """
    steps = len(lam) - 1
    weights = []
    for i, usable in enumerate(usable_orders(steps, order, lower_order_final)):
        if usable == 1:
            r = 0.0 if i == steps - 1 else math.exp(-(lam[i + 1] - lam[i]))
            weights.append((r, [1.0 - r]))
            continue
        h = lam[i + 1] - lam[i]
        r = math.exp(-h)
        r0 = (lam[i] - lam[i - 1]) / h
        d0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m_0 - m_1) / r_0
        if usable == 2:
            w = [1.0 - r, 0.0, 0.0]
            w = [a + (1.0 - r) * 0.5 * b for a, b in zip(w, d0, strict=True)]
            weights.append((r, w[:2]))
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1 = [0.0, 1.0 / r1, -1.0 / r1]  # (m_1 - m_2) / r_1
        diff = [a - b for a, b in zip(d0, d1, strict=True)]
        big_d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d0, diff, strict=True)]
        big_d2 = [b / (r0 + r1) for b in diff]
        c1, c2 = (r - 1.0) / h + 1.0, 2.0 * ((r - 1.0 + h) / h**2 - 0.5)
        w = [(1.0 - r) * (j == 0) + c1 * a - c2 * b for j, (a, b) in
             enumerate(zip(big_d1, big_d2, strict=True))]
        weights.append((r, w))
    return weights


class _DPMSolverMultistep(_FixedStepODE):
    """DPM-Solver++ multistep of a fixed order (see the module doc); one evaluation per step."""

    order = 2

    def __init__(self, steps: int, spacing: Spacing, rho: float, lower_order_final: bool,
                 clip_x0: float | None = None) -> None:
        super().__init__(steps, spacing, rho, clip_x0)
        self.lower_order_final = lower_order_final

    def weights(self, process: NoiseProcess) -> list[tuple[float, list[float]]]:
        key = ("dpm_weights", self.order, self.steps, self.spacing, float(self.rho),
               self.lower_order_final)
        return cached(process, key, lambda: multistep_weights(
            self.table(process).rows["lam"], self.order, self.lower_order_final))

    def prepare(self, process: NoiseProcess, state: dict) -> None:
        weights = state["weights"] = self.weights(process)
        alpha = state["alpha"][0]
        state["r"] = scalars(process, ("dpm_r", self.order, self.steps, self.spacing,
                                       float(self.rho), self.lower_order_final),
                             lambda: [r for r, _ in weights], alpha.device, alpha.dtype)
        state["x0"] = []

    def step(self, model, y, rows, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        x0 = self.denoised(model, y, rows, i, state, recorder)
        history = state["x0"]
        history.insert(0, x0)
        del history[self.order:]
        r, w = state["weights"][i]
        return mix(r, state["r"][i], y, history, w)


def mix(r: float, r_scalar: Tensor, y: Tensor, terms: list[Tensor], weights: list[float]
        ) -> Tensor:
    """``r y + sum_k weights[k] terms[k]`` as one new tensor (``r_scalar``: ``r`` as a cached
    0-dim tensor, :func:`~diffusers_kit.solvers.tables.scalars`); zero weights are skipped."""
    out = torch.mul(y, r_scalar) if r else None
    for weight, m in zip(weights, terms, strict=False):
        if weight:
            out = m * weight if out is None else out.add_(m, alpha=weight)
    return out if out is not None else torch.zeros_like(y)


class DPMSolver2M(_DPMSolverMultistep):
    """DPM-Solver++(2M): a second-order multistep solver in log-SNR for few-step sampling
    (Lu et al. 2022, Algorithm 2); one evaluation per step.

    Args:
        steps: number of steps (= network evaluations).
        spacing: ``auto`` (default: the process's ``default_spacing``, ``quadratic`` on DDPM / VP /
            sub-VP, ``log_snr`` elsewhere), ``log_snr``, ``quadratic``, ``edm`` (Karras et al.
            2022), ``uniform``. On DDPM the quadratic grid (DPM-Solver's
            "time_quadratic") errs 0.137 / 0.047 / 0.013 at 5 / 10 / 20 NFE against 0.236 /
            0.076 / 0.025 on equal log-SNR steps (the exact-score mixture); on VE it is the
            less accurate (about 1.5x): see :class:`UniPC`.
        rho: the exponent of the ``edm`` spacing.
        lower_order_final: below 15 steps, take the step into varsigma_min at first order
            (:func:`usable_orders`).
        clip_x0: clamp every x0 prediction to [-clip_x0, clip_x0] before it enters the
            multistep update (DPM-Solver++'s thresholding of the data prediction for
            pixel-space models; images in [-1, 1]: 1.0; DDIM's option). None: off.
    """

    order = 2

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 20,
        spacing: Spacing = "auto",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        lower_order_final: bool = True,
        clip_x0: ClipX0 = None,
    ) -> None:
        super().__init__(steps, spacing, rho, lower_order_final, clip_x0)


class DPMSolver3M(_DPMSolverMultistep):
    """DPM-Solver++(3M): the third-order multistep solver in log-SNR (Lu et al. 2022);
    one evaluation per step.

    Args:
        steps: number of steps (= network evaluations).
        spacing: ``auto`` (default: the process's ``default_spacing``, ``quadratic`` on DDPM / VP /
            sub-VP, ``log_snr`` elsewhere), ``log_snr``, ``quadratic``, ``edm`` (Karras et al.
            2022), ``uniform``.
        rho: the exponent of the ``edm`` spacing.
        lower_order_final: below 15 steps, no step takes a higher order than the steps
            left to varsigma_min allow: the step into varsigma_min first order, the one
            before it at most second (:func:`usable_orders`; at 5 steps the same steps
            as DPM-Solver++(2M)). Off: every step third order once it has the history.
        clip_x0: clamp every x0 prediction to [-clip_x0, clip_x0] before it enters the
            multistep update (DPM-Solver++'s thresholding of the data prediction for
            pixel-space models; images in [-1, 1]: 1.0; DDIM's option). None: off.
    """

    order = 3

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 20,
        spacing: Spacing = "auto",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        lower_order_final: bool = True,
        clip_x0: ClipX0 = None,
    ) -> None:
        super().__init__(steps, spacing, rho, lower_order_final, clip_x0)

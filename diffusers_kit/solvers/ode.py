"""Probability-flow ODE samplers (Song et al. 2021, eq. 13): adaptive scipy and fixed-step torch.

The probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 grad log q_t(x) / 2`` shares every marginal
with the forward SDE. ``ScipyODE`` integrates it as given, the whole batch as one flattened system,
with any of ``scipy.integrate.solve_ivp``'s methods.

The torch solvers run wholly on the device and use the change of variables of DDIM / EDM
(Song et al. 2021a, eq. 14; Karras et al. 2022, eq. 4): with ``y = x / alpha`` and the noise level
``varsigma = sigma / alpha``, for every process with marginal ``x_t = alpha x0 + sigma eps`` the
ODE becomes::

    dy / d varsigma = eps_hat(alpha y, t(varsigma))

* ``euler``: one Euler step per grid interval (equals DDIM with eta = 0);
* ``heun``: Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), an Euler
  step for the last interval, so N steps cost 2N - 1 evaluations;
* ``dpm_solver_2m``: the two-step multistep method in log-SNR of DPM-Solver++(2M) (Lu et al. 2022,
  Algorithm 2). With ``lambda = -log varsigma``, ``r_i = varsigma_{i+1} / varsigma_i``,
  ``h_i = lambda_{i+1} - lambda_i``::

      y_{i+1} = r_i y_i + (1 - r_i) D_i,
      D_i = (1 + 1 / (2 q)) x0_hat_i - 1 / (2 q) x0_hat_{i-1},   q = h_{i-1} / h_i

  (first order, ``D_i = x0_hat_i``, on the first and the last step).

Every grid ends at ``varsigma = 0``: the last step lands on the denoised estimate without an
extra evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.integrate import solve_ivp

from diffusers_kit.solvers.ancestral import on_device
from diffusers_kit.solvers.base import Progress, Recorder, SampleResult, Solver, model_device
from diffusers_kit.solvers.grids import Spacing, noise_level, sampling_times

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
        keep_trajectory: also return x at ``snapshots`` evenly spaced times.
        keep_x0: also return x0_hat at those times (one evaluation each, counted in nfe).
        snapshots: how many times to record when asked.
    """

    def __init__(
        self,
        method: Method = "RK45",
        rtol: Annotated[float, Field(gt=0)] = 1e-5,
        atol: Annotated[float, Field(gt=0)] = 1e-5,
        t_end: Annotated[float, Field(ge=0, lt=1)] | None = None,
        denoise: bool = True,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=2)] = 10,
    ) -> None:
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.t_end = t_end
        self.denoise = denoise
        self.keep_trajectory = keep_trajectory
        self.keep_x0 = keep_x0
        self.snapshots = snapshots

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
        t_end = process.t_min if self.t_end is None else self.t_end
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        record = self.keep_trajectory or self.keep_x0
        t_eval = list(np.linspace(1.0, t_end, self.snapshots)) if record else None
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
        return SampleResult(x, model.nfe - start, trajectory, x0_predictions, times)


def ode_grid(process: NoiseProcess, steps: int, spacing: Spacing, rho: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Times, noise levels ``varsigma`` (last one 0) and ``alpha`` of an ODE grid (float64)."""
    times = sampling_times(process, steps, spacing, rho)
    level = noise_level(process, times)
    level[-1] = 0.0  # land on the denoised estimate
    alpha = process.alpha(times)
    return times, level, alpha


class _FixedStepODE(Solver):
    """Shared set-up of the torch-native probability-flow ODE solvers (see the module doc)."""

    evaluations_per_step = 1

    def __init__(
        self,
        steps: int,
        spacing: Spacing,
        rho: float,
        keep_trajectory: bool,
        keep_x0: bool,
        snapshots: int,
    ) -> None:
        self.steps = steps
        self.spacing = spacing
        self.rho = rho
        self.keep_trajectory = keep_trajectory
        self.keep_x0 = keep_x0
        self.snapshots = snapshots

    def total_steps(self, process: NoiseProcess) -> int:
        return len(sampling_times(process, self.steps, self.spacing, self.rho)) - 1

    def coefficients(self, times: Tensor, level: Tensor, alpha: Tensor) -> dict[str, Tensor]:
        return {"t": times, "level": level, "alpha": alpha}

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
        times, level, alpha = ode_grid(process, self.steps, self.spacing, self.rho)
        coef = on_device(self.coefficients(times, level, alpha), device)
        steps = len(times) - 1
        recorder = Recorder(steps, trajectory=self.keep_trajectory, x0=self.keep_x0,
                            snapshots=self.snapshots, times=times[:-1].tolist())
        start = model.nfe
        x = process.prior_sample(shape, generator=generator, device=device)
        y = x / coef["alpha"][0]
        ones = torch.ones(shape[0], device=device)
        state: dict[str, Tensor] = {}
        for i in range(steps):
            y = self.step(model, y, ones, coef, i, steps, state, recorder)
            if progress is not None:
                progress(1)
        return recorder.result(coef["alpha"][-1] * y, model.nfe - start)

    def eps(self, model: ScoreModel, y: Tensor, ones: Tensor, coef: dict[str, Tensor], i: int
            ) -> Tensor:
        return model.predict(coef["alpha"][i] * y, ones * coef["t"][i], "eps")

    def step(self, model, y, ones, coef, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @staticmethod
    def record(recorder: Recorder, i: int, y: Tensor, eps: Tensor, coef: dict[str, Tensor]
               ) -> None:
        x0 = coef["alpha"][-1] * (y - coef["level"][i] * eps)
        recorder.record(i, coef["alpha"][i] * y, x0)


class EulerODE(_FixedStepODE):
    """Euler's method for the probability-flow ODE in ``(x / alpha, sigma / alpha)`` (= DDIM).

    Args:
        steps: number of steps (= network evaluations).
        spacing: ``edm`` (Karras et al. 2022, rho = 7), ``log_snr``, ``uniform``, ``quadratic``.
        rho: the exponent of the ``edm`` spacing.
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 100,
        spacing: Spacing = "edm",
        rho: Annotated[float, Field(gt=0)] = 7.0,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        super().__init__(steps, spacing, rho, keep_trajectory, keep_x0, snapshots)

    def step(self, model, y, ones, coef, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        eps = self.eps(model, y, ones, coef, i)
        if recorder.wants(i):
            self.record(recorder, i, y, eps, coef)
        return y + (coef["level"][i + 1] - coef["level"][i]) * eps


class HeunODE(_FixedStepODE):
    """Heun's second-order method for the probability-flow ODE (Karras et al. 2022, Alg. 1).

    Args:
        steps: number of steps; network evaluations are 2 * steps - 1.
        spacing: ``edm`` (Karras et al. 2022, rho = 7), ``log_snr``, ``uniform``, ``quadratic``.
        rho: the exponent of the ``edm`` spacing.
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 18,
        spacing: Spacing = "edm",
        rho: Annotated[float, Field(gt=0)] = 7.0,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        super().__init__(steps, spacing, rho, keep_trajectory, keep_x0, snapshots)

    def step(self, model, y, ones, coef, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        eps = self.eps(model, y, ones, coef, i)
        if recorder.wants(i):
            self.record(recorder, i, y, eps, coef)
        delta = coef["level"][i + 1] - coef["level"][i]
        euler = y + delta * eps
        if i == steps - 1:
            return euler
        eps_next = self.eps(model, euler, ones, coef, i + 1)
        return y + delta * 0.5 * (eps + eps_next)


class DPMSolver2M(_FixedStepODE):
    """DPM-Solver++(2M): a second-order multistep solver in log-SNR for few-step sampling
    (Lu et al. 2022, Algorithm 2); one evaluation per step.

    Args:
        steps: number of steps (= network evaluations).
        spacing: ``edm`` (Karras et al. 2022, rho = 7), ``log_snr``, ``uniform``, ``quadratic``.
        rho: the exponent of the ``edm`` spacing.
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 20,
        spacing: Spacing = "edm",
        rho: Annotated[float, Field(gt=0)] = 7.0,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        super().__init__(steps, spacing, rho, keep_trajectory, keep_x0, snapshots)

    def coefficients(self, times: Tensor, level: Tensor, alpha: Tensor) -> dict[str, Tensor]:
        steps = len(times) - 1
        ratio = level[1:] / level[:-1]  # r_i = varsigma_{i+1} / varsigma_i (0 on the last step)
        lam = -torch.log(level[:-1])
        current = torch.ones(steps, dtype=torch.float64)
        previous = torch.zeros(steps, dtype=torch.float64)
        for i in range(1, steps - 1):  # second order where both neighbours exist
            q = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            current[i], previous[i] = 1 + 1 / (2 * q), 1 / (2 * q)
        return {"t": times, "level": level, "alpha": alpha, "ratio": ratio,
                "current": current, "previous": previous}

    def step(self, model, y, ones, coef, i, steps, state, recorder):  # type: ignore[no-untyped-def]
        eps = self.eps(model, y, ones, coef, i)
        x0 = y - coef["level"][i] * eps
        if recorder.wants(i):
            recorder.record(i, coef["alpha"][i] * y, coef["alpha"][-1] * x0)
        if "x0" in state:
            d = coef["current"][i] * x0 - coef["previous"][i] * state["x0"]
        else:
            d = x0
        state["x0"] = x0
        return coef["ratio"][i] * y + (1 - coef["ratio"][i]) * d

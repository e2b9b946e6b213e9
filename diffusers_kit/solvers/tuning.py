"""Evaluation times tuned to a model: the grid that brings a few-step ODE solver closest to the
probability-flow ODE's solution from the same start noise.

With a handful of steps a solver's error depends mostly on where its times lie, and the best
place depends on the model (Sabour et al. 2024, "Align Your Steps"; Xue et al. 2024,
"Accelerating Diffusion Sampling with Optimized Time Steps"). :func:`tune_times` chooses them
by the measure the benchmarks use: with ``x_T`` a calibration batch of start noise,
``S_theta(x_T)`` the solver's samples on the times ``theta`` and ``S*(x_T)`` a tight solve
(DPM-Solver++(3M) on ``reference_steps`` steps), it minimises the RMS of ``S_theta(x_T) -
S*(x_T)`` over the ``K - 2`` inner times of a ``K``-step grid (``t_0 = 1`` and the process's
smallest time stay). The times are parametrised by the shares of ``log t_min`` that each of the
``K - 1`` gaps takes (a softmax, so every candidate is a decreasing grid) and searched with
scipy's Nelder-Mead from the solver's own grid; a discrete process's candidates are snapped to
its steps. The tuned solver is the given one with its ``times`` option set; docs/solvers.md
says what it gains and costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import minimize

from diffusers_kit.solvers.grids import given_times, smallest_time
from diffusers_kit.solvers.ode import DPMSolver3M, ODESolver

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


@dataclass(frozen=True)
class TunedTimes:
    """What :func:`tune_times` found: the ``solver`` with its tuned ``times``, the calibration
    error (RMS per coordinate to the reference) of the grid it started from (``before``) and of
    the tuned one (``after``, at most ``before``), and the number of candidate grids tried."""

    solver: Any
    before: float
    after: float
    tried: int

    @property
    def times(self) -> list[float]:
        return list(self.solver.times)


def reference_solution(model: ScoreModel, x_T: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """The probability-flow ODE solved tightly from ``x_T``: DPM-Solver++(3M) on ``steps``
    steps of the process's default spacing."""
    return DPMSolver3M(steps=steps).sample(model, tuple(x_T.shape), x_T=x_T).samples


def tune_times(model: ScoreModel, solver: ODESolver, x_T: torch.Tensor, *,
               reference: torch.Tensor | None = None, reference_steps: int = 1000,
               max_tries: int = 400, progress: Callable[[int], None] | None = None
               ) -> TunedTimes:
    """``solver`` with the evaluation times that minimise its error on ``model`` from the
    calibration noise ``x_T`` (see the module doc). ``reference`` (the tight solve from
    ``x_T``, :func:`reference_solution`) is computed when not given; ``max_tries`` bounds the
    candidate grids tried (each costs ``solver``'s network evaluations on ``x_T``);
    ``progress(1)`` is called for each."""
    if not isinstance(solver, ODESolver):
        raise TypeError(f"tune_times tunes a fixed-step ODE solver's times; "
                        f"{type(solver).__name__} is not one")
    process = model.process
    if (reason := solver.check(process)) is not None:
        raise ValueError(f"{type(solver).__name__} needs {reason}")
    if reference is None:
        reference = reference_solution(model, x_T, reference_steps)
    start = solver.table(process).t[:-1]
    steps = len(start)
    t_end = smallest_time(process)
    log_end = math.log(t_end)
    tried = 0

    def error(candidate: list[float] | None) -> float:
        nonlocal tried
        tried += 1
        if progress is not None:
            progress(1)
        if candidate is None:
            return math.inf
        tuned = dataclasses.replace(solver, steps=steps, times=candidate)
        samples = tuned.sample(model, tuple(x_T.shape), x_T=x_T).samples
        return float((samples - reference).pow(2).mean().sqrt())

    def times_of(logits: np.ndarray) -> list[float] | None:
        """The candidate grid (snapped by :func:`given_times`), or None where two of its times
        share one step of a discrete process."""
        z = np.concatenate([[0.0], logits])
        shares = np.exp(z - z.max())
        shares /= shares.sum()
        times = np.exp(log_end * np.concatenate([[0.0], np.cumsum(shares)]))
        times[0], times[-1] = 1.0, t_end
        try:
            return given_times(process, times.tolist())[:-1].tolist()
        except ValueError:
            return None

    before = error(list(start))
    if steps < 3:  # nothing free: t_0 = 1 and t_min stay
        return TunedTimes(dataclasses.replace(solver, steps=steps, times=list(start)), before,
                          before, tried)
    gaps = -np.diff(np.log(np.asarray(start)))
    logits = np.log(np.maximum(gaps[1:], 1e-12) / max(gaps[0], 1e-12))
    found = minimize(lambda p: error(times_of(p)), logits, method="Nelder-Mead",
                     options={"maxfev": max_tries, "xatol": 1e-3, "fatol": 1e-7})
    best, after = times_of(found.x), float(found.fun)
    if best is None or not after < before:
        best, after = list(start), before
    return TunedTimes(dataclasses.replace(solver, steps=steps, times=best), before, after, tried)


__all__ = ["TunedTimes", "reference_solution", "tune_times"]

"""Per-step coefficient tables of the grid-based samplers, built once per (process, grid).

Row ``i`` describes the move ``t = times[i] -> s = times[i + 1]``. Every table is built in float64
from the process's own formulas (marginal, transition, posterior, drift, diffusion) and cached
with the grid (:func:`diffusers_kit.solvers.grids.cached`); the loops read its rows as Python
floats (the ``alpha=`` of a fused ``torch.add``) or, for the factors they scale the state by, as
cached 0-dim tensors of the state's device and dtype (:meth:`TimeGrid.scalar
<diffusers_kit.solvers.grids.TimeGrid.scalar>`): no host synchronisation and no per-step
indexing on the device.

**The last move lands on noise level 0.** Its target is the clean end ``x = alpha(0) x0``
(``sigma_s = 0``), as the ODE solvers' grids end at ``sigma / alpha = 0``: posterior
``(c_t, c_0, var) = (0, alpha_s, 0)``, transition ``a = alpha_t / alpha_s``, ``b^2 = sigma_t^2``.
For DDPM, VP, sub-VP and OU (``sigma(0) = 0``) this is what the formulas give anyway; for VE
(``sigma(0) = sigma_min``) it makes the last step Tweedie's denoising step instead of a no-op
from ``t = 0`` to ``t = 0``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from diffusers_kit.processes.base import posterior_of
from diffusers_kit.processes.gaussian import clipped_log_variance
from diffusers_kit.solvers.grids import Spacing, TimeGrid, cached, time_grid

if TYPE_CHECKING:
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def _build(process: NoiseProcess, grid: TimeGrid) -> TimeGrid:
    times = grid.times
    t, s = times[:-1], times[1:].clone()
    alpha_t, sigma_t = process.marginal(t)
    alpha_s, sigma_s = process.marginal(s)
    a, b = process.transition(t, s)
    b2 = b**2
    # the last move lands on the clean end: sigma_s = 0
    sigma_s[-1] = 0.0
    a[-1] = alpha_t[-1] / alpha_s[-1]
    b2[-1] = sigma_t[-1] ** 2
    c_t, c_0, posterior_var = posterior_of(a, b2, alpha_s, sigma_s, sigma_t)
    # where beta~ = 0 (the last move): fixed variances fall back on beta (Ho et al.), a learned
    # one's lower bound on the move above's beta~ (Nichol & Dhariwal's clipped log variance)
    above = torch.cat([posterior_var[:1], posterior_var[:-1]])
    above = torch.where(above > 0, above, b2)
    drift = process.drift(torch.ones(len(t), 1, dtype=torch.float64), t)[:, 0]
    g = process.diffusion(t)
    tensors = {
        "t": t, "dt": t - times[1:], "alpha_t": alpha_t, "sigma_t": sigma_t,
        "alpha_s": alpha_s, "sigma_s": sigma_s, "a": a, "b2": b2,
        "c_t": c_t, "c_0": c_0, "posterior_var": posterior_var, "transition_var": b2,
        "log_posterior": clipped_log_variance(posterior_var, b2),
        "log_posterior_clipped": clipped_log_variance(posterior_var, above),
        "log_transition": b2.log(), "drift": drift, "g2": g * g,
        # the posterior mean with Tweedie's x0_hat = (x + sigma_t^2 s) / alpha_t substituted:
        # c_t x + c_0 x0_hat = ancestral_x x + ancestral_score s (one fused step per move)
        "ancestral_x": c_t + c_0 / alpha_t, "ancestral_score": c_0 * sigma_t**2 / alpha_t,
        "neg_inv_sigma": -1.0 / sigma_t,  # s = -eps_hat / sigma_t
        "reverse_x": 2.0 - a,  # reverse diffusion's factor on x
        "euler_x": 1.0 - drift * (t - times[1:]),  # Euler-Maruyama's factor on x
    }
    rows = {name: value.tolist() for name, value in tensors.items()}
    return replace(grid, tensors=tensors, rows=rows, _vectors={})


def step_table(process: NoiseProcess, steps: int | None, spacing: Spacing = "uniform",
               rho: float = 7.0) -> TimeGrid:
    """The cached :class:`~diffusers_kit.solvers.grids.TimeGrid` of ``sampling_times(process,
    steps, spacing, rho)`` with its step rows."""
    key = ("step_table", steps, spacing, float(rho))
    return cached(process, key, lambda: _build(process, time_grid(process, steps, spacing, rho)))

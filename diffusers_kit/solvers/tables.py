"""Per-step coefficient tables of the grid-based samplers, built once per (process, grid).

Row ``i`` describes the move ``t = times[i] -> s = times[i + 1]``. Every table is built in float64
from the process's own formulas (marginal, transition, posterior, drift, diffusion) and cached
with the grid (:func:`diffusers_kit.solvers.grids.cached`); the loops read its rows as Python
floats (the ``alpha=`` of a fused ``torch.add``) or, for the factors they scale the state by, as
0-dim tensors of the state's device and dtype cached per (process, grid, device, dtype)
(:func:`scalars`, :meth:`StepTable.rows_on`): no host synchronisation, no per-step indexing on
the device and no per-step allocation of a scalar tensor.

**The last move lands on noise level 0.** Its target is the clean end ``x = alpha(0) x0``
(``sigma_s = 0``), as the ODE solvers' grids end at ``sigma / alpha = 0``: posterior
``(c_t, c_0, var) = (0, alpha_s, 0)``, transition ``a = alpha_t / alpha_s``, ``b^2 = sigma_t^2``.
For DDPM, VP, sub-VP and OU (``sigma(0) = 0``) this is what the formulas give anyway; for VE
(``sigma(0) = sigma_min``) it makes the last step Tweedie's denoising step instead of a no-op
from ``t = 0`` to ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diffusers_kit.processes.base import posterior_of
from diffusers_kit.processes.gaussian import clipped_log_variance
from diffusers_kit.solvers.grids import Spacing, TimeGrid, cached, sampling_times

if TYPE_CHECKING:
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


@dataclass(frozen=True)
class StepTable:
    """``times`` (``N + 1``, float64) and per-move rows: ``tensors`` (float64, ``(N,)``) and the
    same values as Python floats in ``rows`` (what the loops read)."""

    times: Tensor
    tensors: dict[str, Tensor]
    rows: dict[str, list[float]]
    _vectors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def t(self) -> list[float]:
        """The ``N + 1`` times (the last 0) as floats."""
        return self.times.tolist()

    vectors = TimeGrid.vectors

    def rows_on(self, process: NoiseProcess, device: torch.device, dtype: torch.dtype
                ) -> dict[str, list]:
        """``rows`` plus, under ``"<name>:tensor"``, the rows in :data:`TENSOR_ROWS` as 0-dim
        tensors on ``device`` in ``dtype`` (see :func:`scalars`), cached per device and dtype:
        what the predictors of :mod:`diffusers_kit.solvers.sde` get as ``c`` (a predictor that
        knows no ``:tensor`` key reads the float rows as before)."""

        def build() -> dict[str, list]:
            out: dict[str, list] = dict(self.rows)
            for name in TENSOR_ROWS:
                out[f"{name}:tensor"] = [torch.tensor(v, dtype=dtype, device=device)
                                         for v in self.rows[name]]
            return out

        return cached(process, ("rows_on", id(self), str(device), dtype), build)


#: The step-table rows a loop multiplies a state by (offered as 0-dim tensors by ``rows_on``).
TENSOR_ROWS = ("ancestral_x", "neg_inv_sigma", "reverse_x", "euler_x")


def scalars(process: NoiseProcess, key: tuple, values: Callable[[], Sequence[float]],
            device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """``values()`` as 0-dim tensors on ``device`` in ``dtype``, cached per ``(process, key,
    device, dtype)`` (``key`` names the values: the table and solver settings they come from).

    A loop scales its state by these rather than by Python floats: ``x * 0.5`` wraps the float
    into a new tensor at every call (about 4 us on the CPU for a 64 x 2 batch), ``x * c`` with a
    ready ``c`` of the state's dtype does not (about 1.7 us); the value is the same (a float
    multiplies a float32 tensor in float32 either way). Sums use ``torch.add(..., alpha=w)``
    with the float ``w``, which wraps nothing."""
    return cached(process, ("scalars", *key, str(device), dtype),
                  lambda: [torch.tensor(v, dtype=dtype, device=device) for v in values()])


def _build(process: NoiseProcess, times: Tensor) -> StepTable:
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
    return StepTable(times, tensors, rows)


def step_table(process: NoiseProcess, steps: int | None, spacing: Spacing = "uniform",
               rho: float = 7.0) -> StepTable:
    """The cached :class:`StepTable` of ``sampling_times(process, steps, spacing, rho)``."""
    key = ("step_table", steps, spacing, float(rho))
    return cached(process, key,
                  lambda: _build(process, sampling_times(process, steps, spacing, rho)))

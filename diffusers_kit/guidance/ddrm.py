"""DDRM, denoising diffusion restoration models (Kawar, Elad, Ermon & Song 2022): a DDIM-like
sampler run in the SVD basis of the operator, a guidance term that takes the sampler's steps.

**Why a step, not a prediction.** Every other measurement method changes the model's
prediction at ``(x_t, t)`` and leaves the move ``t -> s`` to the solver. DDRM's move cannot be
written that way: in each spectral direction it mixes ``x0_hat``, the state and the measurement
with weights that depend on the *next* noise level ``sigma_s`` (``s_i sigma_s`` against
``sigma_y`` decides the case), and it draws fresh noise of a different variance per direction.
So the term keeps the unconditional prediction (DDRM's ``x0_hat`` is the unconditional model's,
as in the paper) and declares ``takes_step``: a solver that honours it (DDIM) asks it for each
move (:meth:`Guidance.step <diffusers_kit.guidance.base.Guidance.step>`) on its own grid of
times, clipping and noise stream; the others refuse it by name. ``restore: {method: {kind:
ddrm, ...}, solver: {kind: ddim, steps: 20}}`` is the paper's sampler (it used 20 steps).

**The update** (the paper's eqs. 7-8, in its variance-exploding units: ``x_bar = V^T x /
alpha``, noise level ``sigma = sigma_t / alpha_t``; ``A = U diag(s) V^T``,
``y_bar_i = (U^T y)_i / s_i``, ``x0_bar = V^T x0_hat``, ``eps_bar = V^T (x_t - alpha_t x0_hat) /
sigma_t``; ``z ~ N(0, 1)`` fresh per direction). For the move to noise level ``sigma_s``:

- ``s_i = 0`` (the null space: nothing measured) — DDIM with DDRM's ``eta``:
  ``x0_bar + sqrt(1 - eta^2) sigma_s eps_bar + eta sigma_s z``;
- ``s_i sigma_s < sigma_y`` (the measurement is noisier than the state will be) — pulled
  towards ``y_bar``: ``x0_bar + sqrt(1 - eta^2) sigma_s (y_bar - x0_bar) / (sigma_y / s_i)
  + eta sigma_s z``;
- ``s_i sigma_s >= sigma_y`` (the state will be noisier than the measurement) — the
  measurement, topped up with noise: ``(1 - eta_b) x0_bar + eta_b y_bar + sqrt(sigma_s^2 -
  eta_b^2 sigma_y^2 / s_i^2) z``.

and ``x_s = alpha_s V x_bar_s``. Directions whose singular value is below ``1e-6`` of the
largest count as unmeasured (as :class:`~diffusers_kit.guidance.Replacement` does). The last
move lands on ``sigma_s = 0``: ``x0_bar`` in the null space and wherever ``sigma_y > 0``,
``(1 - eta_b) x0_bar + eta_b y_bar`` along measured directions of a noiseless measurement
(``y_bar`` itself at ``eta_b = 1``). The paper starts from ``x_T`` drawn around ``y_bar``
along the measured directions; here the start is the prior's, which the first move (at
``sigma_T >> sigma_y / s_i``) replaces by ``eta_b y_bar`` plus ``(1 - eta_b) x0_hat(x_T)`` —
the same start up to that ``x0_hat`` term (zero at ``eta_b = 1``).

**eta_b = "ddpm".** The paper's defaults are ``eta = 0.85``, ``eta_b = 1``. With ``eta = 1``
and, per direction, ``eta_b = 2 sigma_s^2 / (sigma_s^2 + sigma_y^2 / s_i^2)`` every Kullback-
Leibler term of DDRM's evidence bound weighs ``||x0_bar - x0_hat||^2`` by the same
``1 / (2 sigma_s^2)`` in all three cases (derived here from the three kernels; the paper argues
from such weights that a model trained for DDPM is optimal for DDRM's bound). That is a
statement about training, not about sampling: the sampler with these settings is *not* an exact
posterior sampler even on a Gaussian prior (its reverse kernels put the posterior mean
``x0_hat`` where the posterior of ``x_0`` given ``x_t`` belongs), and without measurement noise
``eta_b`` would be 2, which never lands on the measurement (refused); the bias is measured in
``docs/inverse.md`` (``tests/test_ddrm_ddnm.py``).

Args:
    operator: the forward model (with an SVD, Gaussian noise ``sigma_y``).
    eta: the share of fresh noise in the null space and the noisy-measurement case
        (0: deterministic there; the paper: 0.85).
    eta_b: the weight of the measurement where the state is noisier than it (the paper: 1),
        or ``ddpm`` for the per-direction value above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.guidance.base import TakesStep
from diffusers_kit.guidance.measurement import MeasurementGuidance, measured_directions
from diffusers_kit.hookspecs import OptionError

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


class DDRM(TakesStep, MeasurementGuidance):
    """Denoising diffusion restoration models (Kawar et al. 2022): see the module doc.

    Args:
        operator: the forward model (with an SVD).
        eta: fresh-noise share (0 .. 1; the paper: 0.85).
        eta_b: weight of the measurement (0 .. 2; the paper: 1), or ``ddpm``.
    """

    needs_svd = True
    needs_gaussian_noise = True

    def __init__(self, operator: ForwardModel,
                 eta: Annotated[float, Field(ge=0, le=1)] = 0.85,
                 eta_b: Annotated[float, Field(ge=0, le=2)] | Literal["ddpm"] = 1.0) -> None:
        super().__init__(operator, 1.0, None)
        if eta_b != "ddpm" and not (isinstance(eta_b, (int, float)) and 0 <= eta_b <= 2):
            raise OptionError("eta_b", "a weight in [0, 2] or 'ddpm'", eta_b)
        if not 0 <= eta <= 1:
            raise OptionError("eta", "a share in [0, 1]", eta)
        if eta_b == "ddpm" and operator.sigma_y == 0:
            raise ValueError("eta_b: 'ddpm' needs measurement noise (sigma_y > 0): without it "
                             "the weight is 2 in every measured direction, which reflects "
                             "x0_hat about the measurement and never lands on it; give a number "
                             "(the paper: 1)")
        self.eta = float(eta)
        self.eta_b = eta_b if eta_b == "ddpm" else float(eta_b)

    def step(self, model: ScoreModel, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             move: Mapping[str, float],
             randn_like: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """The move to ``sigma_s`` of the module doc, in the SVD basis."""
        operator = self.operator
        alpha_t, sigma_t = move["alpha_t"], move["sigma_t"]
        alpha_s, sigma_s = move["alpha_s"], move["sigma_s"]
        level = sigma_s / alpha_s
        measured = self.measurement(model, x)
        x0_bar = operator.Vt(x0)
        eps_bar = operator.Vt((x - alpha_t * x0) / sigma_t)
        z = operator.Vt(randn_like(x)) if randn_like is not None else torch.zeros_like(x0_bar)
        eta, sigma_y = self.eta, operator.sigma_y
        # the null space (and every direction below the cutoff): DDIM with DDRM's eta
        out = x0_bar + math.sqrt(1 - eta**2) * level * eps_bar + eta * level * z
        s = self.singulars(x0_bar)
        r = s.numel()
        kept = measured_directions(s)
        safe = torch.where(kept, s, torch.ones_like(s))
        coords = operator.Ut(measured)[:, :r]
        u0, noise = x0_bar[:, :r], z[:, :r]
        noisier = kept & (s * level < sigma_y)  # the measurement is noisier than x_s
        if sigma_y > 0:
            pulled = (u0 + math.sqrt(1 - eta**2) * level * (coords - s * u0) / sigma_y
                      + eta * level * noise)
        else:
            pulled = u0  # never used: no direction is noisier than a noiseless measurement
        if self.eta_b == "ddpm":  # 2 sigma_s^2 / (sigma_s^2 + sigma_y^2 / s^2); 2 if sigma_y = 0
            weight = (2 * level**2 * safe**2 / (level**2 * safe**2 + sigma_y**2)
                      if level > 0 or sigma_y > 0 else torch.full_like(s, 2.0))
        else:
            weight = torch.full_like(s, float(self.eta_b))
        spread = (level**2 - (weight * sigma_y / safe) ** 2).clamp_min(0).sqrt()
        towards = (1 - weight) * u0 + weight * coords / safe + spread * noise
        row = torch.where(noisier, pulled, torch.where(kept, towards, out[:, :r]))
        out = torch.cat([row, out[:, r:]], dim=1)
        return alpha_s * operator.V(out)


__all__ = ["DDRM"]

"""UniPC: the unified predictor-corrector multistep solver in log-SNR (Zhao et al. 2023).

W. Zhao, L. Bai, Y. Rao, J. Zhou and J. Lu, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", NeurIPS 2023 (arXiv:2302.04867), Algorithms 2 and 3.

On DPM-Solver++'s grid (:mod:`diffusers_kit.solvers.ode`: ``y = x / alpha``, ``lambda = -log
varsigma``, data predictions ``m``), for the move ``i -> i + 1`` with ``h = lambda_{i+1} -
lambda_i``, ``r = e^-h``, ``m_k`` the prediction made ``k`` steps earlier, ``r_k = (lambda_{i-k}
- lambda_i) / h``, ``D_k = (m_k - m_0) / r_k``, ``hh = -h``, ``B(h) = expm1(hh)`` (``bh2``) or
``hh`` (``bh1``) and ``g_j = hh phi_{j+1}(hh)`` (``phi_1(z) = (e^z - 1) / z``, ``phi_{j+1}(z) =
(phi_j(z) - 1/j!) / z``):

* **UniP-p** (the predictor, order ``p``)::

      y_{i+1} = r y_i + (1 - r) m_0 - B(h) sum_{k<p} a_k D_k,
      sum_k a_k r_k^(j-1) = j! g_j / B(h),   j = 1 .. p - 1

  (``p = 1``: DDIM). With one unknown (UniP-2, UniC-1) ``a_1 = 1/2``, as in the authors' code: it
  meets the order condition (``g_1 / B(h) -> 1/2``); only then does ``B(h)`` matter.
* **UniC-p** (the corrector): after evaluating at the predicted ``y_{i+1}`` (``m_new``) the same
  step is taken again with ``m_new`` as one more point (``r_p = 1``), raising the order by one at
  no extra evaluation; ``m_new`` is what later steps use, the corrected ``y_{i+1}`` where the next
  starts.

Orders follow :func:`~diffusers_kit.solvers.ode.usable_orders`; the last step (onto ``varsigma =
0``) is ``y = m_0`` and takes no corrector, so ``nfe == steps``. Measurements (``bh2`` with
``a_1 = 1/2`` the most accurate variant; order 2 by default): ``docs/solvers.md``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from diffusers_kit.solvers.base import ClipX0, Rho, Steps, Times, options
from diffusers_kit.solvers.grids import Spacing
from diffusers_kit.solvers.ode import Multistep, UniStep, usable_orders

Variant = Literal["bh1", "bh2"]


def _coefficients(h: float, rks: list[float], variant: Variant) -> tuple[float, list[float]]:
    """``B(h)`` and ``a`` with ``sum_k a_k rks[k]^(j-1) = j! g_j / B(h)`` (one unknown:
    ``a = 1/2``, see the module doc)."""
    hh = -h
    big_b = math.expm1(hh) if variant == "bh2" else hh
    if not rks:
        return big_b, []
    if len(rks) == 1:
        return big_b, [0.5]  # 1! g_1 / B(h) = 1/2 + O(h): the order condition holds
    g, rhs, factorial = math.expm1(hh) / hh - 1.0, [], 1.0  # g_1 = hh phi_2(hh)
    for j in range(1, len(rks) + 1):
        rhs.append(g * factorial / big_b)
        factorial *= j + 1
        g = g / hh - 1.0 / factorial
    matrix = np.array([[rk ** (j - 1) for rk in rks] for j in range(1, len(rks) + 1)])
    return big_b, np.linalg.solve(matrix, np.array(rhs)).tolist()


def _combine(r: float, h_weights: list[float], big_b: float, a: list[float],
             rks: list[float]) -> list[float]:
    """Weights on ``(m_0, m_1, ...)`` of ``(1 - r) m_0 - B sum_k a_k (m_k - m_0) / r_k``."""
    out = [1.0 - r, *h_weights]
    for k, (ak, rk) in enumerate(zip(a, rks, strict=True), start=1):
        out[0] += big_b * ak / rk
        out[k] -= big_b * ak / rk
    return out


def unipc_weights(lam: list[float], order: int, lower_order_final: bool, variant: Variant,
                  corrector: bool = True) -> list[UniStep]:
    """The per-step coefficients of UniPC (see the module doc) on a grid with log-SNR ``lam``
    (``inf`` at the final ``varsigma = 0``)."""
    steps = len(lam) - 1
    plan = []
    for i, usable in enumerate(usable_orders(steps, order, lower_order_final,
                                             math.isinf(lam[0]))):
        if i == steps - 1:  # onto varsigma = 0: h = inf
            plan.append(UniStep(0.0, [1.0], None))
            continue
        h = lam[i + 1] - lam[i]
        r = math.exp(-h)
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, usable)]
        big_b, a = _coefficients(h, rks, variant)
        predictor = _combine(r, [0.0] * len(rks), big_b, a, rks)
        correct = None
        # the state after the step into varsigma_min is ignored by the last step: no corrector
        if corrector and i + 1 < steps - 1:
            big_b, a = _coefficients(h, [*rks, 1.0], variant)
            old = _combine(r, [0.0] * len(rks), big_b, a[:-1], rks)
            new = -big_b * a[-1]  # - B a_p (m_new - m_0)
            old[0] += big_b * a[-1]
            correct = [new, *old]
        plan.append(UniStep(r, predictor, correct))
    return plan


@options
class UniPC(Multistep):
    """UniPC (Zhao et al. 2023): the multistep predictor UniP with the corrector UniC, on the
    data prediction with ``B(h) = expm1(-h)`` (``bh2``); one evaluation per step.

    Args:
        steps: number of steps (= network evaluations).
        order: the predictor's order ``p`` (the corrector makes each step ``p + 1``); the
            paper recommends 3 unconditional, 2 guided; 2 by default (as in diffusers).
        variant: ``bh2`` (``B(h) = e^h - 1``, default) or ``bh1`` (``B(h) = h``).
        corrector: apply UniC (off: UniP alone, a DPM-Solver++-like multistep method).
        lower_order_final: below 15 steps, no step of a higher predictor order than the steps
            left to varsigma_min allow (:func:`~diffusers_kit.solvers.ode.usable_orders`).
        clip_x0: clamp every data prediction (``m_0`` and the corrector's ``m_new``) to
            [-clip_x0, clip_x0] (DPM-Solver++'s thresholding; images in [-1, 1]: 1.0). None: off.
    """

    steps: Steps = 20
    order: Annotated[int, Field(ge=1, le=4)] = 2
    spacing: Spacing = "auto"
    rho: Rho = 7.0
    variant: Variant = "bh2"
    corrector: bool = True
    lower_order_final: bool = True
    clip_x0: ClipX0 = None
    times: Times = None

    def plan(self, lam: list[float]) -> list[UniStep]:
        return unipc_weights(lam, self.order, self.lower_order_final, self.variant,
                             self.corrector)

"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C): average the weights with power-function profiles
during training, keep a few snapshots, and after training reconstruct the average of any
length by least squares.

**Power-function EMA.** At step ``t`` the average ``theta_hat_t = beta_t theta_hat_{t-1} + (1 -
beta_t) theta_t`` with ``beta_t = (1 - 1 / t)^(gamma + 1)`` (EDM2, eq. 2) puts on the weights
``theta_tau`` of step ``tau = 1..t`` the exact weights

    w_t(tau) = (tau^(gamma + 1) - (tau - 1)^(gamma + 1)) / t^(gamma + 1),

the integrals over the unit cells ``[tau - 1, tau]`` of the profile ``p_{t, gamma}(u) = (gamma +
1) u^gamma / t^(gamma + 1)`` on ``[0, t]`` (the product of the betas telescopes). Its width
relative to the length of training,

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))      (EDM2, eq. 3),

is the knob: :func:`gamma_of_sigma_rel` inverts it (the real root above -1 of a cubic).

**Reconstruction.** Training weights are constant on each step's cell, so an average is the
integral of its profile against them, and profiles combine linearly. Given snapshots ``i`` with
profiles ``p_i = p_{t_i, gamma_i}``, the combination ``sum_i x_i theta_hat_i`` whose profile is
nearest to a target ``p*`` in ``L^2([0, inf))`` solves ``G x = b`` with the closed-form inner
products (EDM2, appendix C.3)

    <p_{ta, ga}, p_{tb, gb}> = (ga + 1)(gb + 1) min(ta, tb)^(ga + gb + 1)
                               / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)).

A snapshot's own profile is reconstructed exactly (``x`` the unit vector).

**Limits.** The inner products grow like ``min(t)^(ga + gb + 1)`` and the Gram matrix of nearby
profiles is ill-conditioned (EDM2 uses a few widths and many steps, as here); the least-squares
solve is in float64, and its error is the profile distance ``||p_rec - p*||``, which
:func:`profile_error` computes so that a caller can tell how far a requested width lies from
what the snapshots can express.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def sigma_rel_of_gamma(gamma: float) -> float:
    """``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel`` in ``(0, 12^-1/2)``: the real
    root above -1 of ``s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + 12 s^2 - 1 = 0`` (eq. 3 squared
    and multiplied out)."""
    if not 0 < sigma_rel < 1 / math.sqrt(12):
        raise ValueError(f"sigma_rel must lie in (0, {1 / math.sqrt(12):.4f}) (gamma > -1), "
                         f"got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    return float(max(real))


def power_weights(t: int, gamma: float) -> torch.Tensor:
    """``w_t(tau)``, ``tau = 1..t``: the weight of step ``tau``'s parameters in the power-function
    EMA after ``t`` updates (float64; sums to 1)."""
    tau = torch.arange(0, t + 1, dtype=torch.float64) / t
    cumulative = tau ** (gamma + 1)
    return cumulative[1:] - cumulative[:-1]


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``<p_{t_a, gamma_a}, p_{t_b, gamma_b}>`` in ``L^2`` (the module docstring), written as
    ``(gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi)^gamma_hi / t_hi``
    (``gamma_hi`` the exponent of the later snapshot), which is the same quantity without
    powers of ``t`` that overflow for short averages (large ``gamma``) late in training."""
    (t_lo, _), (t_hi, gamma_hi) = sorted([(t_a, gamma_a), (t_b, gamma_b)])
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (t_lo / t_hi) ** gamma_hi / t_hi)


def normal_equations(snapshots: Sequence[tuple[float, float]], t: float, gamma: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(G, b)`` with ``G_ij = <p_i, p_j>`` over the snapshots ``(t_i, gamma_i)`` and ``b_i =
    <p_i, p_{t, gamma}>``, in float64."""
    gram = np.array([[profile_inner(ta, ga, tb, gb) for tb, gb in snapshots]
                     for ta, ga in snapshots], dtype=np.float64)
    target = np.array([profile_inner(ta, ga, t, gamma) for ta, ga in snapshots])
    return gram, target


def solve_coefficients(snapshots: Sequence[tuple[float, float]], t: float, gamma: float
                       ) -> np.ndarray:
    """The least-squares ``x`` with ``sum_i x_i p_i ~ p_{t, gamma}`` for snapshots ``(t_i,
    gamma_i)`` (``G x = b``; a pseudo-inverse where ``G`` is singular)."""
    return np.linalg.lstsq(*normal_equations(snapshots, t, gamma), rcond=None)[0]


def profile_error(snapshots: Sequence[tuple[float, float]], t: float, gamma: float) -> float:
    """``||sum_i x_i p_i - p*|| / ||p*||`` for the least-squares ``x``: the relative ``L^2``
    distance between the reconstructed profile and the requested one (0 for a stored one)."""
    gram, target = normal_equations(snapshots, t, gamma)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    own = profile_inner(t, gamma, t, gamma)
    squared = float(x @ gram @ x - 2 * x @ target + own)
    return math.sqrt(max(squared, 0.0) / own)


class PowerEMA:
    """Power-function EMAs of a module's parameters at several ``sigma_rels``, with snapshots
    (CPU copies) of each every ``every`` steps: the training side of post-hoc EMA.

    ``update(module, step)`` takes the 1-based step ``t`` (``beta_1 = 0``: the first update
    copies the parameters). :meth:`reconstruct` combines the snapshots into the average of any
    ``sigma_rel`` at any step (EDM2, appendix C).
    """

    def __init__(self, module: torch.nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10),
                 every: int = 100) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.gammas = [gamma_of_sigma_rel(s) for s in sigma_rels]
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.every = int(every)
        self.averages = [[p.detach().clone() for p in module.parameters()] for _ in self.gammas]
        self.names = [name for name, _ in module.named_parameters()]
        #: ``(step, gamma, parameters)`` of every snapshot, in the order taken
        self.snapshots: list[tuple[int, float, list[torch.Tensor]]] = []

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        params = [p.detach() for p in module.parameters()]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            weight = 1.0 - (1.0 - 1.0 / step) ** (gamma + 1)
            torch._foreach_lerp_(average, params, weight)
        if step % self.every == 0:
            self.snapshot(step)

    def snapshot(self, step: int) -> None:
        """Keep a copy of every average as it is at ``step``."""
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            self.snapshots.append((step, gamma, [p.detach().cpu().clone() for p in average]))

    def reconstruct(self, sigma_rel: float, step: int | None = None
                    ) -> dict[str, torch.Tensor]:
        """The parameters (by name) of the power EMA of ``sigma_rel`` at ``step`` (default the
        last snapshot's), combined from the snapshots taken up to then."""
        if not self.snapshots:
            raise ValueError("no snapshots yet: PowerEMA.update snapshots every "
                             f"{self.every} steps")
        step = max(s for s, _, _ in self.snapshots) if step is None else step
        used = [(s, g, p) for s, g, p in self.snapshots if s <= step]
        x = solve_coefficients([(s, g) for s, g, _ in used], step, gamma_of_sigma_rel(sigma_rel))
        combined = [torch.zeros_like(p) for p in used[0][2]]
        for coefficient, (_, _, params) in zip(x, used, strict=True):
            torch._foreach_add_(combined, params, alpha=float(coefficient))
        return dict(zip(self.names, combined, strict=True))

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, metadata)``: the running averages (``average.<i>.<j>``: width ``i``,
        parameter ``j``) and the snapshots (``snapshot.<k>.<j>``), with the widths, the cadence
        and each snapshot's ``(step, gamma)`` as JSON-ready metadata."""
        tensors = {f"average.{i}.{j}": p for i, average in enumerate(self.averages)
                   for j, p in enumerate(average)}
        tensors.update({f"snapshot.{k}.{j}": p for k, (_, _, params) in enumerate(self.snapshots)
                        for j, p in enumerate(params)})
        meta = {"sigma_rels": self.sigma_rels, "every": self.every, "names": self.names,
                "snapshots": [[step, gamma] for step, gamma, _ in self.snapshots]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore :meth:`state_dict` (the widths and parameter names must be this one's)."""
        if [float(s) for s in meta["sigma_rels"]] != self.sigma_rels or list(
                meta["names"]) != self.names:
            raise ValueError(f"the stored power EMAs have widths {meta['sigma_rels']} over "
                             f"{len(meta['names'])} parameters; these have {self.sigma_rels} "
                             f"over {len(self.names)}")
        count = len(self.names)
        for i, average in enumerate(self.averages):
            for j in range(count):
                average[j].copy_(tensors[f"average.{i}.{j}"])
        self.snapshots = [(int(step), float(gamma),
                           [tensors[f"snapshot.{k}.{j}"].cpu() for j in range(count)])
                          for k, (step, gamma) in enumerate(meta["snapshots"])]

    @classmethod
    def from_state(cls, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                   meta: dict) -> PowerEMA:
        """A :class:`PowerEMA` of ``module`` holding a stored :meth:`state_dict`."""
        ema = cls(module, meta["sigma_rels"], meta["every"])
        ema.load_state_dict(tensors, meta)
        return ema

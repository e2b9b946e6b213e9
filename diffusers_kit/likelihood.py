"""Exact likelihood through the probability-flow ODE, the DDPM variational bound, and encoding.

Instantaneous change of variables (Chen et al. 2018; Song et al. 2021, section 4.3 and appendix
D.2): along ``dx/dt = v(x, t) = f(x, t) - g(t)^2 s(x, t) / 2``::

    log p_0(x_0) = log p_1(x_1) + int_0^1 div v(x_t, t) dt

integrated with ``scipy.integrate.solve_ivp`` on the joint system ``[x, int div v]``, the batch
as one system. The divergence is the exact trace of the Jacobian (one backward pass per data
dimension; small dimension) or the Hutchinson-Skilling estimate ``E_z[z^T (dv/dx) z]`` with one
Gaussian or Rademacher probe per example held fixed over the integration (Grathwohl et al. 2019),
which makes ``log p`` an unbiased estimate.

Bits per dimension of quantised data use uniform dequantization (Song et al. 2021, appendix D.2):
a value on level ``k`` of ``bins`` levels spanning ``[low, high]`` becomes
``low + (high - low) (k + u) / bins``, ``u ~ U(0, 1)``, and
``bpd = -(log p(x_deq) + d log((high - low) / bins)) / (d log 2)``: a bound on the discrete data's
code length (for 8-bit data in ``[-1, 1]`` the offset is the familiar +7 bits).

The DDPM variational bound (Ho et al. 2020, eq. 5) is a second, independent estimate:
``L = L_T + sum_t L_{t-1} + L_0``, each term from the process's KL helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from diffusers_kit.solvers.grids import reaches_pure_noise
from diffusers_kit.solvers.ode import data_velocity, integrate_probability_flow, probability_flow

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor
Divergence = Literal["exact", "hutchinson"]
Probe = Literal["gaussian", "rademacher"]


@dataclass
class LikelihoodResult:
    """``log_prob`` per example (nats), the latent ``x_1`` and the network evaluations."""

    log_prob: Tensor
    latent: Tensor
    nfe: int


PAPER_EPS = 1e-5  # Song et al. 2021, appendix D.2: likelihoods integrate from t = 1e-5


def start_time(process: NoiseProcess, t_start: float | str | None) -> float:
    """The likelihood's starting time: ``None`` / ``t_min`` -> the process's ``t_min``,
    ``paper`` -> :data:`PAPER_EPS` (continuous processes only), a float -> itself."""
    if t_start is None or t_start == "t_min":
        return float(process.t_min)
    if t_start == "paper":
        if process.num_steps is not None:
            raise ValueError("t_start 'paper' (eps = 1e-5) is for continuous processes; a "
                             f"discrete one starts at its first step, t_min = {process.t_min:g}")
        return PAPER_EPS
    if isinstance(t_start, str):
        raise ValueError(f"unknown t_start {t_start!r}; expected a number, 't_min' or 'paper'")
    return float(t_start)


def flow_field(process: NoiseProcess) -> Callable[[ScoreModel, Tensor, Tensor], Tensor]:
    """The probability-flow field the likelihood integrates: ``f - g^2 s / 2``
    (:func:`~diffusers_kit.solvers.ode.probability_flow`), or, on a process with ``alpha(1) =
    0`` (flow matching), the same field in its data form
    (:func:`~diffusers_kit.solvers.ode.data_velocity`), which stays finite at ``t = 1`` where
    ``f`` and ``g^2`` do not."""
    return data_velocity if reaches_pure_noise(process) else probability_flow


def drift_and_divergence(
    model: ScoreModel, x: Tensor, t: Tensor, probe: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``v(x, t)`` and ``div v`` per example: exact trace when ``probe`` is None, else the
    Hutchinson estimate ``probe . (dv/dx) probe``. ``v`` is :func:`flow_field`'s."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        drift = flow_field(model.process)(model, x, t).to(x.dtype)
        flat = drift.flatten(1)
        if probe is not None:
            (vjp,) = torch.autograd.grad((flat * probe.flatten(1)).sum(), x)
            divergence = (vjp.flatten(1) * probe.flatten(1)).sum(1)
        else:
            columns = []
            for j in range(flat.shape[1]):
                (row,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
                columns.append(row.flatten(1)[:, j])
            divergence = torch.stack(columns, 1).sum(1)
    return drift.detach(), divergence.detach()


def make_probe(shape: tuple[int, ...], kind: Probe, generator: torch.Generator | None,
               device: torch.device, dtype: torch.dtype) -> Tensor:
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return z.sign() if kind == "rademacher" else z


def log_likelihood(
    model: ScoreModel,
    x0: Tensor,
    *,
    divergence: Divergence = "exact",
    probe: Probe = "rademacher",
    method: str = "RK45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float | Literal["t_min", "paper"] | None = None,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """``log p(x0)`` in nats per example via the probability-flow ODE (see the module doc).

    Integration starts at ``t_start``, treating ``x0`` as a sample of ``q_{t_start}``: the
    result is the log-density of the data convolved with ``N(0, sigma(t_start)^2)``, so the start
    must be small against the data's resolution. ``t_min`` (the default, ``None``) is the
    process's ``t_min``: ``1 / T`` for DDPM, 1e-3 for VP (``sigma ~ 0.01``, wider than an 8-bit
    bin of ``2 / 255``); ``paper`` is Song et al. 2021's ``eps = 1e-5`` (appendix D.2; ``sigma ~
    1e-3`` on VP), for continuous processes; a float is taken as is.
    """
    process = model.process
    t0 = start_time(process, t_start)
    shape, device, dtype = x0.shape, x0.device, x0.dtype
    batch, size = shape[0], x0[0].numel()
    z = None
    if divergence == "hutchinson":
        z = make_probe(shape, probe, generator, device, dtype)
    ones = torch.ones(batch, device=device, dtype=dtype)
    start = model.nfe

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(y[: batch * size]).to(device=device, dtype=dtype).reshape(shape)
        drift, div = drift_and_divergence(model, state, ones * t, z)
        return np.concatenate([drift.double().cpu().numpy().reshape(-1),
                               div.double().cpu().numpy()])

    y0 = np.concatenate([x0.detach().double().cpu().numpy().reshape(-1), np.zeros(batch)])
    from scipy.integrate import solve_ivp  # here: importing it costs every dkit command ~0.3 s

    solution = solve_ivp(rhs, (t0, 1.0), y0, method=method, rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"likelihood ODE failed: {solution.message}")
    end = solution.y[:, -1]
    latent = torch.from_numpy(end[: batch * size]).to(device=device, dtype=dtype).reshape(shape)
    integral = torch.from_numpy(end[batch * size:]).to(device)
    log_prob = process.prior_log_prob(latent.double()) + integral
    return LikelihoodResult(log_prob, latent, model.nfe - start)


def dequantize(x: Tensor, bins: int, low: float = -1.0, high: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of data on ``bins`` levels spanning ``[low, high]``."""
    level = torch.round((x - low) / (high - low) * (bins - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return low + (high - low) * (level + u) / bins


def bits_per_dim(log_prob: Tensor, dims: int, bins: int | None = None,
                 low: float = -1.0, high: float = 1.0) -> Tensor:
    """Per example: ``-(log p + d log bin_width) / (d log 2)``; continuous data (``bins=None``)
    have no bin width term."""
    offset = 0.0 if bins is None else dims * math.log((high - low) / bins)
    return -(log_prob + offset) / (dims * math.log(2.0))


def encode(model: ScoreModel, x0: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
           method: str = "RK45", t_start: float | str | None = None) -> Tensor:
    """``x_0 -> x_1`` through the probability-flow ODE (from ``t_start``, as for
    :func:`log_likelihood`)."""
    end, _, _ = integrate_probability_flow(model, x0, start_time(model.process, t_start), 1.0,
                                           method=method, rtol=rtol, atol=atol,
                                           field=flow_field(model.process))
    return end


def decode(model: ScoreModel, latent: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
           method: str = "RK45", t_start: float | str | None = None) -> Tensor:
    """``x_1 -> x_0`` through the probability-flow ODE: the inverse of :func:`encode`."""
    end, _, _ = integrate_probability_flow(model, latent, 1.0, start_time(model.process, t_start),
                                           method=method, rtol=rtol, atol=atol,
                                           field=flow_field(model.process))
    return end


def slerp(a: Tensor, b: Tensor, weights: Tensor) -> Tensor:
    """Spherical interpolation between latents ``a`` and ``b`` (same shape ``(B, ...)``) at
    ``weights`` ``(K,)``: returns ``(B, K, ...)``. Keeps the norm typical of Gaussian latents,
    where a straight line would pass through the low-norm interior."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]  # (B, 1)
    w = weights.to(a)[None, :]  # (1, K)
    sin = torch.sin(omega).clamp_min(1e-8)
    ca = torch.where(omega > 1e-4, torch.sin((1 - w) * omega) / sin, 1 - w)
    cb = torch.where(omega > 1e-4, torch.sin(w * omega) / sin, w)
    out = ca[..., None] * fa[:, None, :] + cb[..., None] * fb[:, None, :]
    return out.reshape(a.shape[0], len(weights), *a.shape[1:])


@torch.no_grad()
def variational_bound(
    model: ScoreModel,
    x0: Tensor,
    *,
    steps: int | None = None,
    variance: Literal["auto", "posterior", "transition", "learned"] = "auto",
    bins: int | None = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The DDPM negative ELBO ``L_T + sum L_{t-1} + L_0`` per example, in nats (Ho et al. 2020,
    eq. 5), over the sampling grid (all steps of a discrete process by default).

    Each ``L_{t-1}`` uses one fresh ``x_t ~ q(x_t | x_0)`` (an unbiased single-sample estimate);
    ``L_0`` is the discretized-Gaussian decoder with ``bins`` levels (``None``: continuous).
    The reverse variance is ``transition`` (beta), ``posterior`` (beta~) or ``learned`` (the
    network's ``v``, Nichol & Dhariwal 2021, eq. 15); ``auto`` is ``learned`` for a network with
    ``learned_variance`` and ``transition`` otherwise. Where ``beta~ = 0`` (the decoder step) the
    clipped ``beta~`` of the step above is used (``beta~_2`` at DDPM's step 1).
    """
    from diffusers_kit.processes.gaussian import learned_log_variance
    from diffusers_kit.solvers.tables import step_table

    process = model.process
    if variance == "auto":
        variance = "learned" if getattr(model.network, "learned_variance", False) else "transition"
    if variance == "learned" and not getattr(model.network, "learned_variance", False):
        raise ValueError("variance 'learned' needs a network with learned_variance = True")
    table = step_table(process, steps, "uniform")
    rows = table.rows
    total = process.prior_kl(x0.double()).to(x0.device)
    batch = x0.shape[0]
    x0d = x0.double()
    for i in range(table.steps):
        t = torch.full((batch,), rows["t"][i], device=x0.device, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = rows["alpha_t"][i] * x0d + rows["sigma_t"][i] * noise.double()
        tt = t.to(x0.dtype)
        prediction, v = model.split(model(x_t.to(x0.dtype), tt))
        x0_hat = model.convert(prediction, x_t.to(x0.dtype), tt, "x0").double()
        mean = rows["c_t"][i] * x_t + rows["c_0"][i] * x0_hat
        if variance == "learned":
            assert v is not None
            var = learned_log_variance(v.double(), rows["log_transition"][i],
                                       rows["log_posterior_clipped"][i]).exp()
        else:
            name = "log_transition" if variance == "transition" else "log_posterior"
            var = math.exp(rows[name][i])
        if i == table.steps - 1:
            total = total + process.decoder_nll(x0d, mean, var, bins=bins)
        else:
            s = torch.full_like(t, rows["t"][i] - rows["dt"][i])
            total = total + process.posterior_kl(x0d, x_t, t, mean, var, s)
    return total.to(x0.dtype)

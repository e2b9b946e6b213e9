"""Gaussian formulas shared by every process and objective: KL, log-densities, bits per dimension.

Each function is elementwise (inputs broadcast against each other); callers sum over data
dimensions. Variances are variances (not standard deviations, not log-variances).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

LOG_2PI = math.log(2.0 * math.pi)


def as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a tensor on ``like``'s device and dtype (floats pass through unchanged)."""
    return torch.as_tensor(value, device=like.device, dtype=like.dtype)


def normal_kl(
    mean_q: Tensor, var_q: Tensor | float, mean_p: Tensor, var_p: Tensor | float
) -> Tensor:
    """``KL(N(mean_q, var_q) || N(mean_p, var_p))`` per coordinate, in nats::

        KL = 1/2 * ( log(var_p / var_q) + (var_q + (mean_q - mean_p)^2) / var_p - 1 )

    (the closed form used for the DDPM bound terms L_T and L_{t-1}; Ho et al. 2020, eq. 5).
    """
    var_q = as_tensor(var_q, mean_q)
    var_p = as_tensor(var_p, mean_q)
    log_ratio = torch.log(var_p) - torch.log(var_q)
    return 0.5 * (log_ratio + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def normal_log_prob(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """``log N(x; mean, var)`` per coordinate: ``-(x - mean)^2 / (2 var) - log(2 pi var) / 2``."""
    var = as_tensor(var, x)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + LOG_2PI)


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, var: Tensor | float, *, bins: int = 256
) -> Tensor:
    """Per-coordinate log-probability of ``bins``-level data under the discretized Gaussian decoder.

    Ho et al. 2020, eq. 13: data ``x`` in ``[-1, 1]`` take ``bins`` equally spaced values (8-bit
    images: ``bins = 256``, spacing ``2 / 255``). The decoder gives each value the Gaussian mass of
    its bin, the two end bins reaching to minus / plus infinity, so the masses sum to one::

        p(x | mean, var) = Phi((x + h - mean) / s) - Phi((x - h - mean) / s),   h = 1 / (bins - 1)

    with ``Phi((x - h - mean) / s)`` replaced by 0 at ``x = -1`` and ``Phi((x + h - mean) / s)`` by
    1 at ``x = 1``. Tails are computed with ``log_ndtr`` (never ``log(1 - Phi)``) for accuracy.
    """
    var = as_tensor(var, x)
    std = var.sqrt()
    half_bin = 1.0 / (bins - 1)
    upper = (x + half_bin - mean) / std
    lower = (x - half_bin - mean) / std
    # log(Phi(upper) - Phi(lower)) = log Phi(upper) + log(1 - exp(log Phi(lower) - log Phi(upper)))
    # is accurate where both are below the mean; mirror the rest (Phi(-z) = 1 - Phi(z)).
    mirror = (upper + lower) > 0
    hi = torch.where(mirror, -lower, upper)
    lo = torch.where(mirror, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    middle = log_hi + torch.log(-torch.expm1(torch.clamp(log_lo - log_hi, max=-1e-30)))
    first = torch.special.log_ndtr(upper)  # x = -1: mass of (-inf, -1 + h]
    last = torch.special.log_ndtr(-lower)  # x = +1: mass of [1 - h, inf)
    edge = 1.0 - half_bin  # any x beyond the second-to-last bin centre is an end bin
    out = torch.where(x < -edge, first, torch.where(x > edge, last, middle))
    return out


def nats_to_bits_per_dim(nats: Tensor | float, dims: int) -> Tensor | float:
    """Convert a negative log-likelihood in nats (per example) to bits per dimension:
    ``nats / (dims * log 2)`` (the unit of Ho et al. 2020, Table 2)."""
    return nats / (dims * math.log(2.0))


def learned_log_variance(v: Tensor, log_upper: Tensor | float, log_lower: Tensor | float
                         ) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 15: the reverse step's log variance interpolated by the
    network's output ``v`` in ``[-1, 1]`` between the bounds ``beta`` (upper) and ``beta~``::

        log sigma^2 = frac log beta + (1 - frac) log beta~,    frac = (v + 1) / 2
    """
    frac = (v + 1.0) / 2.0
    return frac * log_upper + (1.0 - frac) * log_lower


def clipped_log_variance(var: Tensor, fallback: Tensor) -> Tensor:
    """``log var`` where ``var > 0``, else ``log fallback``: the "clipped" log posterior variance of
    Nichol & Dhariwal 2021 (their code's ``posterior_log_variance_clipped``), where DDPM's step 1,
    whose ``beta~_1 = 0``, takes ``beta~_2``, the posterior variance of the step above."""
    return torch.where(var > 0, var, fallback).log()

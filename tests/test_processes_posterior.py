"""The posterior q(x_s | x_t, x_0) and the parameterisations (score, eps, x0, v, mu).

The posterior is checked three ways: against Bayes' rule for the two Gaussians q(x_s | x_0) and
q(x_t | x_s) (product of densities, completed square), against Ho et al. 2020's eq. 7 written from
the beta table, and by Monte Carlo: forward-sampled pairs (x_s, x_t) leave residuals
``x_s - mean(x_t, x_0)`` that are N(0, var) and uncorrelated with x_t (z-bounds from N).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, NoiseProcess, SubVP
from diffusers_kit.testing import (
    assert_parameterisations_agree,
    assert_posterior_is_bayes_rule,
    assert_posterior_matches_monte_carlo,
    process_times,
)

N = 20000




@st.composite
def processes(draw: st.DrawFn) -> NoiseProcess:
    kind = draw(st.sampled_from(["ve", "vp", "subvp", "ou", "ddpm", "cosine", "constant"]))
    if kind == "ve":
        return VE(sigma_min=draw(st.floats(0.01, 0.5)), sigma_max=draw(st.floats(1.0, 20.0)))
    if kind in ("vp", "subvp"):
        cls = VP if kind == "vp" else SubVP
        return cls(beta_min=draw(st.floats(0.0, 1.0)), beta_max=draw(st.floats(1.0, 20.0)))
    if kind == "ou":
        return OU(delta=draw(st.floats(0.005, 0.5)))
    if kind == "constant":
        return ConstantSigma(sigma=draw(st.floats(0.1, 0.6)), delta=draw(st.floats(0.02, 0.5)))
    steps = draw(st.integers(2, 200))
    if kind == "cosine":
        return DDPM(num_steps=steps, schedule="cosine")
    start = draw(st.floats(1e-4, 0.1))
    return DDPM(num_steps=steps, beta_start=start, beta_end=draw(st.floats(start, 0.5)))


@given(process=processes(), u=st.floats(0, 1), v=st.floats(0, 1), dim=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_posterior_is_bayes_rule_of_the_two_gaussians(process, u, v, dim, seed):
    """N(x_s; alpha_s x0, sigma_s^2) N(x_t; a x_s, b^2) is, in x_s, proportional to N(mean, var)
    with 1/var = 1/sigma_s^2 + a^2/b^2 and mean = var (alpha_s x0 / sigma_s^2 + a x_t / b^2)."""
    t, s = process_times(process, u, v)
    gen = torch.Generator().manual_seed(seed)
    x0, x_t = torch.randn(2, 1, dim, generator=gen, dtype=torch.float64)
    assert_posterior_is_bayes_rule(process, t, s, x0, x_t)


@given(process=processes().filter(lambda p: p.num_steps is not None), u=st.floats(0, 1))
def test_posterior_is_ho_et_al_equation_7(process, u):
    """mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) /
    (1 - abar_t) x_t and beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, from the beta table."""
    i = 2 + round(u * (process.num_steps - 2))
    betas = process.betas.tolist()
    abar = math.prod(1 - b for b in betas[:i])
    abar_prev = math.prod(1 - b for b in betas[: i - 1])
    beta = betas[i - 1]
    t = torch.tensor([i / process.num_steps], dtype=torch.float64)
    c_t, c_0, var = process.posterior_coefficients(t, process.previous_time(t))
    assert c_0.item() == pytest.approx(math.sqrt(abar_prev) * beta / (1 - abar), rel=1e-8)
    assert c_t.item() == pytest.approx(math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar),
                                       rel=1e-8)
    assert var.item() == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-8)
    assert process.reverse_variance(t, kind="transition").item() == pytest.approx(beta, rel=1e-8)


@given(process=processes(), u=st.floats(0, 1), v=st.floats(0, 1), dim=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_posterior_matches_monte_carlo(process, u, v, dim, seed):
    """Forward pairs x_s ~ q(x_s | x0), x_t ~ q(x_t | x_s): the residual x_s - mu~(x_t, x0) has mean
    0, variance var and no correlation with x_t, within z-bounds for N samples."""
    t, s = process_times(process, u, v)
    gen = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.randn(1, dim, generator=gen, dtype=torch.float64)
    assert_posterior_matches_monte_carlo(process, t, s, x0, N, gen)


@given(process=processes(), u=st.floats(0, 1), v=st.floats(0, 1), dim=st.integers(1, 4),
       seed=st.integers(0, 2**16),
       source=st.sampled_from(["eps", "score", "x0", "v", "mu"]),
       target=st.sampled_from(["eps", "score", "x0", "v", "mu"]))
def test_parameterisations_describe_the_same_prediction(process, u, v, dim, seed, source, target):
    """From a known (x0, eps): score = -eps / sigma, x0, v = alpha eps - sigma x0 and
    mu = mu~(x_t, x0) all describe it, and convert() maps any one to any other."""
    t, s = process_times(process, u, v)
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, dim, generator=gen, dtype=torch.float64)
    assert_parameterisations_agree(process, t.expand(3), s.expand(3), x0, eps, source, target)


@given(process=processes().filter(lambda p: p.num_steps is not None), u=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_mu_is_ho_et_al_equation_11(process, u, seed):
    """mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t) (previous step)."""
    i = 2 + round(u * (process.num_steps - 2))
    t = torch.full((4,), i / process.num_steps, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x_t, eps = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    beta = process.betas[i - 1].item()
    abar = process.alphas_cumprod[i - 1].item()
    expected = (x_t - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
    assert torch.allclose(process.convert(eps, x_t, t, "eps", "mu"), expected, rtol=1e-8)


def test_continuous_processes_need_an_explicit_earlier_time():
    with pytest.raises(ValueError, match="continuous"):
        VP().posterior(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1))
    with pytest.raises(ValueError, match="unknown prediction"):
        VP().convert(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), "eps", "logits")

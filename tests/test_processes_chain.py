"""Discrete chains against their closed forms: DDPM schedules, the constant-sigma chain, limits.

Statistical checks use fixed seeds and z-bounds derived from the sample size: a sample mean of N
draws of N(m, v) lies within Z * sqrt(v / N) of m, a sample variance within Z * v * sqrt(2 / (N-1)),
a Kolmogorov-Smirnov statistic below sqrt(log(2 / p) / (2 n)) (the DKW inequality), each failing
with probability below ~1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from diffusers_kit.processes import DDPM, OU, VP, ConstantSigma
from diffusers_kit.processes.constant_sigma import chain_length
from diffusers_kit.processes.ddpm import cosine_betas, linear_betas

Z = 6.0  # two-sided tail ~2e-9
KS_P = 1e-9
N = 4000




def ks_bound(n: int, p: float = KS_P) -> float:
    """DKW: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2)."""
    return math.sqrt(math.log(2.0 / p) / (2.0 * n))


def assert_gaussian_samples(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Samples ``x`` (N, d) of N(mean, std^2) coordinatewise: mean, variance and KS z-bounds."""
    n = x.shape[0]
    mean_err = (x.mean(0) - mean).abs()
    assert (mean_err <= Z * std / math.sqrt(n)).all(), (mean_err, std)
    var = x.var(0)
    assert ((var - std**2).abs() <= Z * std**2 * math.sqrt(2.0 / (n - 1))).all(), (var, std**2)
    standardized = ((x - mean) / std).flatten().numpy()
    assert stats.kstest(standardized, "norm").statistic <= ks_bound(standardized.size)


@st.composite
def ddpm_processes(draw: st.DrawFn) -> DDPM:
    """A DDPM with a random schedule: linear, cosine, user-given betas or constant sigma."""
    kind = draw(st.sampled_from(["linear", "cosine", "custom", "constant"]))
    if kind == "linear":
        start = draw(st.floats(1e-4, 0.2))
        end = draw(st.floats(start, 0.4))
        return DDPM(num_steps=draw(st.integers(1, 60)), beta_start=start, beta_end=end)
    if kind == "cosine":
        return DDPM(num_steps=draw(st.integers(1, 60)), schedule="cosine")
    if kind == "custom":
        return DDPM(betas=draw(st.lists(st.floats(1e-4, 0.6), min_size=1, max_size=60)))
    return ConstantSigma(sigma=draw(st.floats(0.1, 0.7)), delta=draw(st.floats(0.02, 0.5)))


@given(process=ddpm_processes(), dim=st.integers(1, 4), seed=st.integers(0, 2**16),
       fraction=st.floats(0.0, 1.0))
def test_iterated_chain_matches_closed_form_marginal(process, dim, seed, fraction):
    """x_k from k one-step transitions (Ho et al. eq. 2) ~ N(sqrt(abar_k) x_0, 1 - abar_k)."""
    k = max(1, round(fraction * process.num_steps))
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(dim, generator=gen, dtype=torch.float64) * 2.0
    x = x0.expand(N, dim).clone()
    for i in range(1, k + 1):
        x = process.step_sample(x, i, torch.randn(N, dim, generator=gen, dtype=torch.float64))
    t = torch.full((1,), k / process.num_steps, dtype=torch.float64)
    alpha, sigma = process.marginal(t)
    assert_gaussian_samples(x, alpha * x0, sigma.expand(dim))


@given(process=ddpm_processes(), fraction=st.floats(0.0, 1.0))
def test_ddpm_tables_are_the_products_of_the_chain(process, fraction):
    """alpha(i/T)^2 = prod_{j<=i} (1 - beta_j), sigma^2 = 1 - that; a step: (sqrt(1-b), sqrt(b))."""
    i = max(1, round(fraction * process.num_steps))
    betas = process.betas.tolist()
    abar = math.prod(1.0 - b for b in betas[:i])
    t = torch.tensor([i / process.num_steps], dtype=torch.float64)
    alpha, sigma = process.marginal(t)
    assert alpha.item() == pytest.approx(math.sqrt(abar), rel=1e-9, abs=1e-300)
    assert sigma.item() ** 2 == pytest.approx(1.0 - abar, rel=1e-9, abs=1e-12)
    a, b = process.transition(t, process.previous_time(t))
    assert a.item() == pytest.approx(math.sqrt(1.0 - betas[i - 1]), rel=1e-9)
    assert b.item() == pytest.approx(math.sqrt(betas[i - 1]), rel=1e-7)


def test_schedules_match_their_papers():
    """Ho et al. 2020's linear 1e-4 -> 0.02 over 1000 steps; Nichol & Dhariwal 2021's cosine."""
    ddpm = DDPM()
    assert ddpm.num_steps == 1000
    assert ddpm.betas[0].item() == pytest.approx(1e-4)
    assert ddpm.betas[-1].item() == pytest.approx(0.02)
    assert torch.equal(ddpm.betas, linear_betas(1000, 1e-4, 0.02))
    # Ho et al. 2020 report abar_T ~ 4e-5 for this schedule (L_T ~ 1e-5 bits/dim)
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    cosine = DDPM(num_steps=1000, schedule="cosine")
    i = torch.arange(1001, dtype=torch.float64)
    f = torch.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    unclipped = (f / f[0])[1:]
    # where no beta was clipped, abar is exactly f(i) / f(0)
    clipped = (1 - unclipped / torch.cat([torch.ones(1, dtype=torch.float64), unclipped[:-1]]))
    unclipped_steps = int((clipped < 0.999).sum())
    assert unclipped_steps < 1000  # the last step is clipped
    assert torch.allclose(cosine.alphas_cumprod[:unclipped_steps], unclipped[:unclipped_steps],
                          rtol=1e-10)
    assert cosine.betas.max().item() == pytest.approx(0.999)
    assert torch.equal(cosine.betas, cosine_betas(1000))


@given(sigma=st.floats(0.01, 0.9), delta=st.floats(1e-4, 0.9))
def test_constant_sigma_chain_length_is_the_least_integer(sigma, delta):
    """L is the least integer with sqrt(1 - sigma^2)^L < delta (TTIC notes, eq. 1)."""
    length = chain_length(sigma, delta)
    a = math.sqrt(1.0 - sigma**2)
    assert a**length < delta
    assert length == 1 or a ** (length - 1) >= delta * (1 - 1e-12)


@given(sigma=st.floats(0.005, 0.5), delta=st.floats(1e-3, 0.5))
def test_constant_sigma_chain_tends_to_the_ou_closed_form(sigma, delta):
    """The chain is the OU process sampled at tau_l = l c, c = -log(1 - sigma^2) / 2, stopped at
    tau_L in (log 1/delta, log 1/delta + c]. So |alpha_chain(t) - e^{-t log(1/delta)}| <= c at
    every t, a bound that vanishes like sigma^2 / 2 as sigma -> 0."""
    chain = ConstantSigma(sigma=sigma, delta=delta)
    ou = OU(delta=delta)
    c = -0.5 * math.log1p(-sigma**2)
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    levels = torch.arange(chain.num_steps + 1, dtype=torch.float64)
    # exactly the OU closed form z_tau = e^{-tau} z_0 + sqrt(1 - e^{-2 tau}) eps at tau_l = l c
    grid = levels / chain.num_steps
    assert torch.allclose(chain.alpha(grid), torch.exp(-levels * c), rtol=1e-9, atol=0)
    assert torch.allclose(chain.sigma(grid) ** 2, -torch.expm1(-2 * levels * c), rtol=1e-9,
                          atol=1e-15)
    horizon_gap = chain.num_steps * c - ou.horizon
    assert 0.0 < horizon_gap <= c * (1 + 1e-9)
    assert ((chain.alpha(t) - ou.alpha(t)).abs() <= c * (1 + 1e-9) + 1e-15).all()
    sigma_gap = (chain.sigma(t) ** 2 - ou.sigma(t) ** 2).abs()
    assert (sigma_gap <= 2 * c * (1 + 1e-9) + 1e-15).all()  # |e^{-2a} - e^{-2b}| <= 2 |a - b|


@given(beta_min=st.floats(0.0, 1.0), beta_max=st.floats(1.0, 20.0),
       steps=st.integers(25, 3000))
def test_ddpm_chain_tends_to_the_vp_sde(beta_min, beta_max, steps):
    """DDPM with beta_i = beta(i/T) / T against the VP SDE (Song et al. 2021, appendix B).

    log alpha_DDPM(t_i) - log alpha_VP(t_i) = (sum_j log(1 - x_j) + int_0^{t_i} beta) / 2 with
    x_j = beta(t_j) / T. Two exact facts bound it: |log(1 - x) + x| <= x^2 / (2 (1 - x)), and the
    right Riemann sum of the linear beta exceeds its integral by i (beta_max - beta_min) / (2 T^2).
    The bound is O(1/T): the chain converges to the SDE.
    """
    vp = VP(beta_min=beta_min, beta_max=beta_max)
    t_grid = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    x = vp.beta(t_grid) / steps
    ddpm = DDPM(betas=x.tolist())
    i = torch.arange(1, steps + 1, dtype=torch.float64)
    bound = 0.5 * (torch.cumsum(x**2 / (2 * (1 - x)), 0)
                   + i * (beta_max - beta_min) / (2 * steps**2))
    gap = (torch.log(ddpm.alpha(t_grid)) - torch.log(vp.alpha(t_grid))).abs()
    assert (gap <= bound * (1 + 1e-6) + 1e-12).all()
    order_one_over_t = (beta_max**2 / 4 + (beta_max - beta_min) / 4) / (steps - beta_max)
    assert bound[-1] <= order_one_over_t * (1 + 1e-9)
    # the SDE coefficients converge too: -T log(1 - x) -> beta(t) on each step
    t_mid = t_grid - 0.5 / steps
    rate_gap = (ddpm.beta(t_mid) - vp.beta(t_mid)).abs()
    assert (rate_gap <= (beta_max - beta_min) / (2 * steps) + steps * x**2 / (1 - x) + 1e-9).all()

"""Gaussian KL, the discretized decoder, bits/dim and the DDPM variational bound (Ho et al. 2020).

The bound is checked on Gaussian data, where everything is closed form:

* with the exact reverse model (prior q(x_T), reverse steps q(x_{t-1} | x_t), decoder
  q(x_0 | x_1)) the bound is tight: ELBO(x_0) = log N(x_0; mu, Sigma) for every x_0;
* with DDPM's model (prior N(0, I), mean from the exact score through the ``mu``
  parameterisation, fixed variances beta_t or beta~_t) the bound never exceeds the model's exact
  log-likelihood, which is itself computable since that model is a linear-Gaussian chain.

Expectations over q(x_t | x_0) = N(m, s^2 I) are of quadratics in x_t, so the 2d "sigma
points" m +- sqrt(d) s e_j (mean m, covariance s^2 I) give them exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from diffusers_kit.processes import DDPM, ConstantSigma, NoiseProcess
from diffusers_kit.processes.gaussian import (
    discretized_gaussian_log_likelihood,
    nats_to_bits_per_dim,
    normal_kl,
    normal_log_prob,
)


@st.composite
def ddpms(draw: st.DrawFn) -> DDPM:
    kind = draw(st.sampled_from(["linear", "cosine", "custom", "constant"]))
    steps = draw(st.integers(2, 30))
    if kind == "linear":
        start = draw(st.floats(1e-3, 0.1))
        return DDPM(num_steps=steps, beta_start=start, beta_end=draw(st.floats(start, 0.6)))
    if kind == "cosine":
        return DDPM(num_steps=steps, schedule="cosine")
    if kind == "custom":
        return DDPM(betas=draw(st.lists(st.floats(1e-3, 0.6), min_size=2, max_size=30)))
    return ConstantSigma(sigma=draw(st.floats(0.2, 0.7)), delta=draw(st.floats(0.05, 0.5)))


def step_time(process: NoiseProcess, i: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), i / process.num_steps, dtype=torch.float64)


def sigma_points(x0: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """(B, 2d, d) points whose equal-weight average of any quadratic is its N(alpha x0, sigma^2)
    expectation."""
    d = x0.shape[-1]
    offsets = math.sqrt(d) * sigma * torch.cat([torch.eye(d), -torch.eye(d)]).double()
    return alpha * x0[:, None, :] + offsets[None]


def elbo(process: DDPM, x0: torch.Tensor, prior_term, model_step) -> torch.Tensor:
    """-(L_T + sum_{t>=2} E L_{t-1} + E L_0) per x0, with the expectations over q(x_t | x0) exact.

    ``model_step(i, x_i)`` gives the model's mean and variance for x_{i-1} (i = 1: the decoder).
    """
    b, d = x0.shape
    total = -prior_term(x0)
    for i in range(1, process.num_steps + 1):
        t = step_time(process, i, 1)
        alpha, sigma = (c.item() for c in process.marginal(t))
        points = sigma_points(x0, alpha, sigma).reshape(b * 2 * d, d)
        x0_rep = x0.repeat_interleave(2 * d, 0)
        mean, var = model_step(i, points)
        if i == 1:
            term = process.decoder_nll(x0_rep, mean, var, bins=None)
        else:
            term = process.posterior_kl(x0_rep, points, step_time(process, i, len(points)),
                                        mean, var)
        total = total - term.reshape(b, 2 * d).mean(1)
    return total


@given(process=ddpms(), dim=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_bound_is_tight_for_the_exact_reverse_model(process, dim, seed):
    """Exact reverse model for data N(mu, diag(v)): ELBO(x_0) = log N(x_0; mu, diag(v)) exactly."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    v = 0.1 + torch.rand(dim, generator=gen, dtype=torch.float64) * 2
    betas = process.betas.tolist()
    abar = [1.0]
    for beta in betas:
        abar.append(abar[-1] * (1 - beta))  # the chain's products, independently of the process

    def moments(i: int):  # q(x_i) = N(sqrt(abar_i) mu, abar_i v + 1 - abar_i), per coordinate
        return math.sqrt(abar[i]) * mu, abar[i] * v + 1 - abar[i]

    def reverse(i: int, x_i: torch.Tensor):  # q(x_{i-1} | x_i) from the joint Gaussian
        m_prev, c_prev = moments(i - 1)
        m_i, c_i = moments(i)
        gain = math.sqrt(1 - betas[i - 1]) * c_prev / c_i
        return m_prev + gain * (x_i - m_i), (c_prev - gain**2 * c_i).expand_as(x_i)

    def prior_term(x0: torch.Tensor) -> torch.Tensor:  # KL(q(x_T | x0) || q(x_T))
        m_t, c_t = moments(process.num_steps)
        a = math.sqrt(abar[-1])
        return normal_kl(a * x0, 1 - abar[-1], m_t.expand_as(x0), c_t.expand_as(x0)).sum(1)

    x0 = mu + torch.randn(5, dim, generator=gen, dtype=torch.float64) * 2 * v.sqrt()
    bound = elbo(process, x0, prior_term, reverse)
    exact = normal_log_prob(x0, mu, v).sum(1)
    assert torch.allclose(bound, exact, rtol=1e-7, atol=1e-7), (bound, exact)


@given(process=ddpms(), seed=st.integers(0, 2**16),
       variance=st.sampled_from(["posterior", "transition"]))
def test_bound_never_exceeds_the_exact_log_likelihood(process, seed, variance):
    """DDPM model (prior N(0, I), mu from the exact score, sigma_t^2 = beta~_t or beta_t, decoder
    variance beta_1): ELBO(x_0) <= log p_model(x_0), the latter from the linear-Gaussian chain."""
    dim = 2
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    factor = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    cov = factor @ factor.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (c.item() for c in process.marginal(t[:1]))
        return -torch.linalg.solve(alpha**2 * cov + sigma**2 * eye, (x - alpha * mu).T).T

    def model_step(i: int, x_i: torch.Tensor):
        t = step_time(process, i, len(x_i))
        mean = process.convert(score(x_i, t), x_i, t, "score", "mu")
        kind = "transition" if i == 1 else variance
        return mean, process.reverse_variance(t, kind=kind)

    # the model's own marginal of x_0: push N(0, I) through the affine-Gaussian steps
    basis = torch.cat([torch.zeros(1, dim, dtype=torch.float64), eye])
    m, c = torch.zeros(dim, dtype=torch.float64), eye.clone()
    for i in range(process.num_steps, 0, -1):
        step_mean, step_var = model_step(i, basis)
        offset, matrix = step_mean[0], (step_mean[1:] - step_mean[0]).T
        m, c = matrix @ m + offset, matrix @ c @ matrix.T + step_var[0] * eye
    x0 = mu + torch.randn(6, dim, generator=gen, dtype=torch.float64) @ factor.T * 2
    log_p = torch.distributions.MultivariateNormal(m, c).log_prob(x0)
    bound = elbo(process, x0, process.prior_kl, model_step)
    assert (bound <= log_p + 1e-9 * log_p.abs()).all(), (bound, log_p)


@given(mean_q=st.floats(-3, 3), var_q=st.floats(0.05, 4), mean_p=st.floats(-3, 3),
       var_p=st.floats(0.05, 4))
def test_normal_kl_is_the_integral(mean_q, var_q, mean_p, var_p):
    """KL = int q log(q / p), by quadrature."""
    q = stats.norm(mean_q, math.sqrt(var_q))
    p = stats.norm(mean_p, math.sqrt(var_p))
    lo, hi = mean_q - 15 * math.sqrt(var_q), mean_q + 15 * math.sqrt(var_q)
    value, error = integrate.quad(lambda x: q.pdf(x) * (q.logpdf(x) - p.logpdf(x)), lo, hi)
    got = normal_kl(torch.tensor(mean_q, dtype=torch.float64), var_q,
                    torch.tensor(mean_p, dtype=torch.float64), var_p).item()
    assert got == pytest.approx(value, rel=1e-5, abs=max(10 * error, 1e-7))


@given(mean=st.floats(-1.5, 1.5), std=st.floats(1e-3, 2.0))
def test_discretized_decoder_is_a_distribution_over_the_256_levels(mean, std):
    """Ho et al. 2020, eq. 13: the 256 bin masses sum to 1 and equal the CDF differences."""
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64), std**2)
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)
    edges = torch.cat([torch.tensor([-math.inf]), (x[:-1] + x[1:]) / 2, torch.tensor([math.inf])])
    cdf = stats.norm.cdf(edges.numpy(), mean, std)
    mass = torch.from_numpy(cdf[1:] - cdf[:-1])
    big = mass > 1e-200
    assert torch.allclose(log_p.exp()[big], mass[big], rtol=1e-6, atol=1e-12)


def test_discretized_decoder_tails_stay_finite_and_narrow_bins_match_the_density():
    x = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    means = torch.tensor([1.0, -1.0, 0.9], dtype=torch.float64)
    far = discretized_gaussian_log_likelihood(x, means, 1e-4)
    assert torch.isfinite(far).all()  # masses like Phi(-200): log_ndtr, not log(0)
    # a wide Gaussian: bin mass ~ density * bin width
    log_p = discretized_gaussian_log_likelihood(x[2:], torch.zeros(1).double(), 1.0)
    expected = normal_log_prob(x[2:], 0.0, 1.0) + math.log(2 / 255)
    assert log_p.item() == pytest.approx(expected.item(), abs=1e-5)


def test_nats_to_bits_per_dim():
    # a uniform distribution over 256 levels in each of 3072 dimensions is 8 bits/dim
    assert nats_to_bits_per_dim(3072 * math.log(256), 3072) == pytest.approx(8.0)


@pytest.mark.parametrize("process", [DDPM(), DDPM(num_steps=1000, schedule="cosine")], ids=repr)
def test_prior_term_is_negligible_for_standard_schedules(process):
    """L_T for data in [-1, 1] (E x0^2 <= 1) is ~1e-5 bits/dim for Ho's schedule (Ho et al. 2020,
    section 4) and agrees with the closed form 1/2 (sigma^2 + alpha^2 - 1 - log sigma^2)."""
    t = torch.ones(1, dtype=torch.float64)
    alpha, sigma = (c.item() for c in process.marginal(t))
    closed = 0.5 * (sigma**2 + alpha**2 - 1 - math.log(sigma**2))
    assert process.expected_prior_kl() == pytest.approx(closed, rel=1e-9)
    assert nats_to_bits_per_dim(process.expected_prior_kl(), 1) < 1e-4

"""Forward SDEs against their closed-form marginals (Euler-Maruyama), and the 1-D prior density.

Every forward SDE here is linear, ``f(x, t) = a(t) x``, so K Euler-Maruyama steps from a Gaussian
start give an exactly Gaussian result whose mean and variance follow a recursion
(``m <- (1 + a h) m``, ``v <- (1 + a h)^2 v + g^2 h``). Two checks, neither with a tuned constant:

* the recursion converges to the closed form at first order: doubling K halves the error
  (a wrong drift or diffusion converges to something else, and the error stops shrinking);
* Monte-Carlo Euler-Maruyama samples match the recursion within sample-size z-bounds, and the
  closed form within those bounds plus the (exactly computed) discretisation bias.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, NoiseProcess, SubVP
from diffusers_kit.testing import (
    Z,
    assert_prior_is_a_density,
    assert_sde_matches_marginal,
    assert_transition_composes,
    euler_maruyama_moments,
    on_grid,
    sde_step_count,
)

N = 4000




@st.composite
def sde_processes(draw: st.DrawFn) -> NoiseProcess:
    kind = draw(st.sampled_from(["ve", "vp", "subvp", "ou", "ddpm"]))
    if kind == "ve":
        return VE(sigma_min=draw(st.floats(0.01, 0.5)), sigma_max=draw(st.floats(1.0, 20.0)))
    if kind in ("vp", "subvp"):
        cls = VP if kind == "vp" else SubVP
        return cls(beta_min=draw(st.floats(0.0, 1.0)), beta_max=draw(st.floats(1.0, 20.0)))
    if kind == "ou":
        return OU(delta=draw(st.floats(0.005, 0.5)))
    start = draw(st.floats(1e-3, 0.1))
    return DDPM(num_steps=draw(st.integers(2, 16)), beta_start=start,
                beta_end=draw(st.floats(start, 0.5)))


@given(process=sde_processes(), t1=st.floats(0.2, 1.0), x0=st.floats(-3.0, 3.0))
def test_euler_maruyama_moments_converge_to_the_marginal(process, t1, x0):
    """The exact EM moments converge (first order) to alpha(t) x0 and sigma(t)^2 (the check
    diffusers_kit.testing.check_process applies to a plugin's process)."""
    assert_sde_matches_marginal(process, t1, x0)


@given(process=sde_processes(), t1=st.floats(0.2, 1.0), seed=st.integers(0, 2**16),
       dim=st.integers(1, 3))
def test_euler_maruyama_samples_match_the_marginal(process, t1, seed, dim):
    """Monte-Carlo EM with the process's own step: sample moments within z-bounds."""
    t1 = on_grid(process, t1)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(dim, generator=gen, dtype=torch.float64) * 2.0
    steps = sde_step_count(process, 400, t1)
    h = t1 / steps
    start = torch.zeros(N, dtype=torch.float64)
    x, _ = process.marginal_sample(x0.expand(N, dim), start,
                                   torch.randn(N, dim, generator=gen, dtype=torch.float64))
    for k in range(steps):
        t = torch.full((N,), k * h, dtype=torch.float64)
        x = process.euler_maruyama_step(x, t, h, torch.randn(N, dim, generator=gen,
                                                            dtype=torch.float64))
    alpha, sigma = process.marginal(torch.tensor([0.0, t1], dtype=torch.float64))
    for j in range(dim):
        mean, var = euler_maruyama_moments(process, 0.0, t1, steps, alpha[0].item() * x0[j].item(),
                               sigma[0].item() ** 2)
        exact_mean, exact_var = alpha[1].item() * x0[j].item(), sigma[1].item() ** 2
        sample_mean, sample_var = x[:, j].mean().item(), x[:, j].var().item()
        se_mean, se_var = math.sqrt(var / N), var * math.sqrt(2.0 / (N - 1))
        assert abs(sample_mean - mean) <= Z * se_mean
        assert abs(sample_var - var) <= Z * se_var
        assert abs(sample_mean - exact_mean) <= Z * se_mean + abs(mean - exact_mean)
        assert abs(sample_var - exact_var) <= Z * se_var + abs(var - exact_var)


@given(process=sde_processes(), s=st.floats(0.0, 0.9), gap=st.floats(0.01, 1.0))
def test_transition_composes_the_marginals(process, s, gap):
    """q(x_t | x_0) = int q(x_t | x_s) q(x_s | x_0):
    alpha_t = a alpha_s and sigma_t^2 = a^2 sigma_s^2 + b^2."""
    assert_transition_composes(process, s, min(1.0, s + gap))


@given(process=sde_processes(), t=st.floats(0.05, 1.0))
def test_variance_preserving_family_keeps_unit_variance(process, t):
    """VP-type processes: alpha^2 + sigma^2 = 1; sub-VP: sigma = 1 - alpha^2 <= sqrt(1 - alpha^2);
    log-SNR as stated; the SNR decreases in t."""
    tt = torch.tensor([t / 2, t], dtype=torch.float64)
    alpha, sigma = process.marginal(tt)
    if isinstance(process, SubVP):
        assert torch.allclose(sigma, 1 - alpha**2, rtol=1e-12)
    elif not isinstance(process, VE):
        assert torch.allclose(alpha**2 + sigma**2, torch.ones(2, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(process.log_snr(tt), torch.log(alpha**2 / sigma**2), rtol=1e-9)
    assert process.snr(tt)[1] < process.snr(tt)[0]


def test_ou_is_the_ttic_closed_form():
    """z_tau = e^{-tau} z_0 + sqrt(1 - e^{-2 tau}) eps, dz = -z dtau + sqrt(2) dw (TTIC notes)."""
    ou = OU(delta=0.05)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    tau = ou.physical_time(t)
    assert torch.allclose(ou.alpha(t), torch.exp(-tau))
    assert torch.allclose(ou.sigma(t), torch.sqrt(1 - torch.exp(-2 * tau)))
    assert ou.alpha(torch.ones(1, dtype=torch.float64)).item() == pytest.approx(0.05)
    # per unit of physical time: drift -z, diffusion sqrt(2)
    x = torch.randn(11, 1, dtype=torch.float64)
    assert torch.allclose(ou.drift(x, t) / ou.horizon, -x)
    assert torch.allclose(ou.diffusion(t) / math.sqrt(ou.horizon), torch.full_like(t, math.sqrt(2)))


@pytest.mark.parametrize(
    "process", [VE(), VE(sigma_min=0.1, sigma_max=3.0), VP(), SubVP(), OU(), DDPM(),
                ConstantSigma()], ids=repr
)
def test_prior_density_is_normalized_in_one_dimension(process):
    """int p(x_1) dx = 1 numerically, and prior samples have the prior's variance."""
    assert_prior_is_a_density(process, N)

"""Gaussian data N(mu, Sigma): the exact score drives the reverse SDE and the probability flow back.

For data N(mu, Sigma) every noised marginal is N(alpha mu, alpha^2 Sigma + sigma^2 I), whose
score is ``-(alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu)``. Started from the exact marginal at
t = 1, the reverse-time SDE (Song et al. 2021, eq. 6) and the probability-flow ODE (eq. 13) must
return the marginal at t = 0, which for variance-preserving processes is N(mu, Sigma) itself.

The drifts are affine in x, so the Euler(-Maruyama) iterates are exactly Gaussian with moments
given by a recursion (each step's affine map is read off the process's own drift evaluated at
0 and the unit vectors). The recursion must converge to the target at first order (see
``assert_first_order_convergence``); Monte-Carlo runs must match the recursion within z-bounds.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusers_kit.processes import DDPM, OU, VE, VP, NoiseProcess, SubVP
from diffusers_kit.testing import assert_first_order_convergence

Z = 6.0
N = 4000
DIM = 2



@st.composite
def processes(draw: st.DrawFn) -> NoiseProcess:
    kind = draw(st.sampled_from(["ve", "vp", "subvp", "ou", "ddpm"]))
    if kind == "ve":
        return VE(sigma_min=draw(st.floats(0.01, 0.3)), sigma_max=draw(st.floats(2.0, 10.0)))
    if kind in ("vp", "subvp"):
        cls = VP if kind == "vp" else SubVP
        return cls(beta_min=draw(st.floats(0.05, 1.0)), beta_max=draw(st.floats(5.0, 20.0)))
    if kind == "ou":
        return OU(delta=draw(st.floats(0.005, 0.1)))
    return DDPM(num_steps=draw(st.integers(5, 25)), beta_start=draw(st.floats(0.01, 0.05)),
                beta_end=draw(st.floats(0.1, 0.5)))


@st.composite
def gaussians(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean in [-2, 2]^d and a covariance L L^T + 0.1 I with a random factor L."""
    mean = torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=DIM, max_size=DIM)),
                        dtype=torch.float64)
    entries = draw(st.lists(st.floats(-1.5, 1.5), min_size=DIM * DIM, max_size=DIM * DIM))
    factor = torch.tensor(entries, dtype=torch.float64).reshape(DIM, DIM)
    return mean, factor @ factor.T + 0.1 * torch.eye(DIM, dtype=torch.float64)


def marginal_moments(process, mean, cov, t: float):
    alpha, sigma = (c.item() for c in process.marginal(torch.tensor([t], dtype=torch.float64)))
    return alpha * mean, alpha**2 * cov + sigma**2 * torch.eye(len(mean), dtype=torch.float64)


def exact_score(process, mean, cov):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, c = marginal_moments(process, mean, cov, t[0].item())
        return -torch.linalg.solve(c, (x - m).T).T

    return score


def reverse_step_maps(process, mean, cov, times, flow: bool):
    """Per step (t_k -> t_k - h): x <- A_k x + b_k + sqrt(noise_k) z, from the process's drift
    evaluated at the step's midpoint time (inside a DDPM step: its rate jumps at the steps)."""
    score = exact_score(process, mean, cov)
    basis = torch.cat([torch.zeros(1, DIM), torch.eye(DIM)]).double()
    maps = []
    for k in range(len(times) - 1):
        t, h = (times[k] + times[k + 1]) / 2, (times[k] - times[k + 1]).item()
        tt = t.expand(DIM + 1)
        if flow:
            drift = process.probability_flow_drift(basis, tt, score(basis, tt))
            noise = 0.0
        else:
            drift = process.reverse_drift(basis, tt, score(basis, tt))
            noise = process.diffusion(t[None]).item() ** 2 * h
        offset = drift[0]
        matrix = (drift[1:] - offset).T
        maps.append((torch.eye(DIM, dtype=torch.float64) - h * matrix, -h * offset, noise))
    return maps


def integrate_moments(maps, mean, cov):
    for a, b, noise in maps:
        mean = a @ mean + b
        cov = a @ cov @ a.T + noise * torch.eye(DIM, dtype=torch.float64)
    return mean, cov


def times_for(process, steps: int) -> torch.Tensor:
    if process.num_steps is not None:  # whole sub-steps within each DDPM step
        steps = process.num_steps * math.ceil(steps / process.num_steps)
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


@given(process=processes(), data=gaussians(), flow=st.booleans())
def test_reverse_dynamics_with_exact_score_recover_the_data(process, data, flow):
    """Moments after integrating t: 1 -> 0 converge to N(alpha_0 mu, alpha_0^2 Sigma + sigma_0^2 I)
    (= N(mu, Sigma) for VP-type processes): the Richardson limit of K, 2K, 4K steps is on it."""
    mean, cov = data
    start = marginal_moments(process, mean, cov, 1.0)
    target = torch.cat(marginal_moments(process, mean, cov, 0.0)[:1]
                       + (marginal_moments(process, mean, cov, 0.0)[1].flatten(),))
    iterates = []
    for steps in (100, 200, 400):
        maps = reverse_step_maps(process, mean, cov, times_for(process, steps), flow)
        m, c = integrate_moments(maps, *start)
        iterates.append(torch.cat([m, c.flatten()]))
    assert_first_order_convergence(iterates, target)
@given(process=processes(), data=gaussians(), flow=st.booleans(), seed=st.integers(0, 2**16))
def test_reverse_dynamics_samples_recover_the_data(process, data, flow, seed):
    """Monte Carlo with the process's drifts: samples match the exact iterate moments (z-bounds),
    and the target N(mu, Sigma) within z-bounds plus the exact discretisation bias."""
    mean, cov = data
    gen = torch.Generator().manual_seed(seed)
    start_mean, start_cov = marginal_moments(process, mean, cov, 1.0)
    factor = torch.linalg.cholesky(start_cov)
    x = start_mean + torch.randn(N, DIM, generator=gen, dtype=torch.float64) @ factor.T
    times = times_for(process, 200)
    score = exact_score(process, mean, cov)
    for k in range(len(times) - 1):
        t, h = ((times[k] + times[k + 1]) / 2).expand(N), (times[k] - times[k + 1]).item()
        if flow:
            x = x - h * process.probability_flow_drift(x, t, score(x, t))
        else:
            z = torch.randn(N, DIM, generator=gen, dtype=torch.float64)
            g = process.diffusion(t[:1]).item()
            x = x - h * process.reverse_drift(x, t, score(x, t)) + g * math.sqrt(h) * z
    m, c = integrate_moments(reverse_step_maps(process, mean, cov, times, flow),
                             start_mean, start_cov)
    target_mean, target_cov = marginal_moments(process, mean, cov, 0.0)
    sample_mean = x.mean(0)
    sample_cov = torch.cov(x.T)
    se_mean = torch.sqrt(torch.diagonal(c) / N)
    # Var(S_ij) = (C_ij^2 + C_ii C_jj) / N for Gaussian samples
    se_cov = torch.sqrt((c**2 + torch.outer(torch.diagonal(c), torch.diagonal(c))) / N)
    assert ((sample_mean - m).abs() <= Z * se_mean).all()
    assert ((sample_cov - c).abs() <= Z * se_cov).all()
    assert ((sample_mean - target_mean).abs() <= Z * se_mean + (m - target_mean).abs()).all()
    assert ((sample_cov - target_cov).abs() <= Z * se_cov + (c - target_cov).abs()).all()

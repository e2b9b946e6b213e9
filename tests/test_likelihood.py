"""Exact likelihood through the probability-flow ODE, against closed-form log-densities."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.likelihood import (
    bits_per_dim,
    decode,
    dequantize,
    encode,
    log_likelihood,
    slerp,
    variational_bound,
)
from diffusers_kit.processes import DDPM, VP, Flow, SubVP
from tests.gaussian_mixture import GaussianMixture, exact_model, three_modes

GAUSSIAN = GaussianMixture([1.0], [[0.3, -0.2, 0.1]], [[0.8, 0.5, 1.2]])


@pytest.mark.parametrize("process", [VP, SubVP, DDPM, Flow])
def test_exact_trace_log_likelihood_of_gaussian_data_is_the_analytic_density(process):
    """The flow's path reaches pure noise, where only a velocity (or x0) network is defined:
    its likelihood integrates the data form of the flow up to t = 1."""
    model = exact_model(GAUSSIAN, process(), "velocity" if process is Flow else "eps")
    x = GAUSSIAN.sample(64, torch.Generator().manual_seed(0))
    result = log_likelihood(model, x, divergence="exact")
    per_dim_error = (result.log_prob - GAUSSIAN.log_prob(x)).abs() / GAUSSIAN.dim
    assert per_dim_error.max() < 0.01, per_dim_error.max()
    assert result.nfe > 0


def test_exact_trace_log_likelihood_of_the_mixture():
    mixture = three_modes()
    model = exact_model(mixture, VP())
    x = mixture.sample(64, torch.Generator().manual_seed(1))
    result = log_likelihood(model, x, divergence="exact")
    per_dim_error = (result.log_prob - mixture.log_prob(x)).abs() / 2
    assert per_dim_error.max() < 0.01, per_dim_error.max()


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_around_the_exact_trace(probe):
    """Replicate each example R times with independent probes in one batch; the mean deviation
    from the exact-trace value must be within 4 standard errors of zero, and its spread real."""
    mixture = three_modes()  # a non-diagonal Jacobian: Rademacher probes are not exact here
    model = exact_model(mixture, VP())
    examples, replicas = 16, 64
    x = mixture.sample(examples, torch.Generator().manual_seed(2))
    exact = log_likelihood(model, x, divergence="exact").log_prob
    repeated = x.repeat(replicas, 1)
    estimate = log_likelihood(model, repeated, divergence="hutchinson", probe=probe,
                              generator=torch.Generator().manual_seed(3)).log_prob
    deviation = estimate - exact.repeat(replicas)
    standard_error = deviation.std() / math.sqrt(len(deviation))
    assert deviation.std() > 1e-3  # the estimator is random ...
    assert deviation.mean().abs() < 4 * standard_error  # ... and centred on the exact value


def test_encode_decode_reconstructs():
    mixture = three_modes()
    model = exact_model(mixture, VP())
    x = mixture.sample(256, torch.Generator().manual_seed(4))
    latent = encode(model, x)
    # the latent is (nearly) standard normal: the prior of VP
    assert abs(float(latent.std()) - 1.0) < 5 / math.sqrt(latent.numel())
    back = decode(model, latent)
    # rtol = atol = 1e-5 each way, local error control: a global error of ~10x the tolerance in
    # RMS, and no coordinate off by more than 1000x it
    error = back - x
    assert error.pow(2).mean().sqrt() < 1e-4
    assert error.abs().max() < 1e-2


def test_slerp_keeps_norms_and_ends():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    path = slerp(a, b, torch.linspace(0, 1, 7))
    assert path.shape == (4, 7, 3, 8, 8)
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    norms = path.flatten(2).norm(dim=2)
    # for orthogonal-ish Gaussian latents of equal norm, slerp stays on the sphere
    assert (norms.min(1).values / norms.max(1).values).min() > 0.8


def test_bits_per_dim_of_uniform_dequantization():
    """Uniform data on 256 levels in [-1, 1] with log p of the uniform density on [-1, 1]
    (log p = -d log 2) costs exactly 8 bits per dimension."""
    d = 5
    x = torch.randint(0, 256, (100, d)).float() / 255 * 2 - 1
    deq = dequantize(x, 256, generator=torch.Generator().manual_seed(6))
    level = torch.round((x + 1) / 2 * 255)
    assert ((deq + 1) / 2 * 256 - level).min() >= 0 and ((deq + 1) / 2 * 256 - level).max() < 1
    bpd = bits_per_dim(torch.full((100,), -d * math.log(2.0)), d, bins=256)
    torch.testing.assert_close(bpd, torch.full((100,), 8.0))


def test_variational_bound_bounds_the_exact_nll_and_tightens_with_steps():
    """E[L] >= -log p for any model: with the exact score the bound sits above the analytic NLL
    (up to its Monte-Carlo error); with the same data and noise draws, 1000 steps give a
    tighter bound than 100 (the discretisation gap shrinks)."""
    gaussian = GaussianMixture([1.0], [[0.0, 0.5]], [[1.0, 0.6]])
    x = gaussian.sample(2000, torch.Generator().manual_seed(7))
    nll = -gaussian.log_prob(x).mean()
    bounds = {}
    for steps in (100, 1000):
        model = exact_model(gaussian, DDPM(num_steps=steps))
        bound = variational_bound(model, x, bins=None, generator=torch.Generator().manual_seed(8))
        standard_error = bound.std() / math.sqrt(len(bound))
        assert bound.mean() > nll - 4 * standard_error, steps
        bounds[steps] = bound
    assert bounds[1000].mean() < bounds[100].mean()

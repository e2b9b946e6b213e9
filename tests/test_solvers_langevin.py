"""Plain Langevin dynamics against closed forms and the analytic mixture."""

from __future__ import annotations

import math

import torch

from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein
from diffusers_kit.processes import VP
from diffusers_kit.solvers import Langevin
from tests.gaussian_mixture import GaussianMixture, exact_model, overlapping_modes


def test_langevin_variance_follows_the_linear_gaussian_recursion():
    """For N(0, v) each step is linear: var' = a^2 var + h with a = 1 - h / (2 v). Iterating the
    recursion from the start variance is an independent route to the chain's variance."""
    v, h, steps, n = 0.3, 0.05, 60, 20_000
    process = VP()
    target = GaussianMixture([1.0], [[0.0, 0.0, 0.0]], [[math.sqrt(v)] * 3])
    model = exact_model(target, process, "score")
    alpha, sigma = (float(c) for c in process.marginal(torch.tensor([process.t_min])))
    v_t = alpha**2 * v + sigma**2
    result = Langevin(steps=steps, step_size=h).sample(
        model, (n, 3), generator=torch.Generator().manual_seed(0))
    var = 1.0
    a = 1 - h / (2 * v_t)
    for _ in range(steps):
        var = a * a * var + h
    sample_var = result.samples.double().var(0)
    # var of a sample variance is 2 var^2 / n: 5 standard errors
    tolerance = 5 * var * math.sqrt(2 / n)
    assert (sample_var - var).abs().max() < tolerance, (sample_var, var)
    assert result.nfe == steps
    assert result.trajectory == [] and result.x0_predictions == []


def test_langevin_reproduces_an_overlapping_mixture():
    mixture = overlapping_modes()
    n = 3000
    gen = torch.Generator().manual_seed(1)
    model = exact_model(mixture, VP())
    samples = Langevin().sample(model, (n, 2), generator=gen).samples
    directions = random_directions(2, 256, torch.Generator().manual_seed(2))
    reference = mixture.sample(n, gen)
    floor = sliced_wasserstein(mixture.sample(n, gen), reference, directions)
    swd = sliced_wasserstein(samples, reference, directions)
    assert swd < 2.0 * floor, (swd, floor)

"""NCSN's pieces checked against closed forms: VE ladder, DSM loss, annealed Langevin, SWD."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusers_kit import VE, AnnealedLangevin, DenoisingScoreMatching, ScoreModel
from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein
from diffusers_kit.networks.base import Network


class ExactGaussianEps(Network):
    """eps-prediction of the exact score of N(mu, s^2 I) noised by the process."""

    def __init__(self, process, mu: torch.Tensor, s: float) -> None:
        super().__init__("eps")
        self.process, self.mu, self.s = process, mu, s
        self.data_shape = tuple(mu.shape)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x, t):
        alpha, sigma = (c.reshape(-1, *([1] * (x.dim() - 1))) for c in self.process.marginal(t))
        score = -(x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)
        return -sigma * score


@given(
    sigma_min=st.floats(0.001, 0.5),
    ratio=st.floats(1.5, 1000.0),
    levels=st.integers(2, 50),
)
def test_ve_ladder_is_geometric_and_g_squared_is_dsigma2_dt(sigma_min, ratio, levels):
    process = VE(sigma_min=sigma_min, sigma_max=sigma_min * ratio, num_levels=levels)
    ladder = process.levels()
    assert ladder[0].item() == pytest.approx(sigma_min * ratio, rel=1e-9)
    assert ladder[-1].item() == pytest.approx(sigma_min, rel=1e-9)
    steps = ladder[:-1] / ladder[1:]
    torch.testing.assert_close(steps, torch.full_like(steps, ratio ** (1 / (levels - 1))))
    t = torch.linspace(0, 1, 7, dtype=torch.float64, requires_grad=True)
    (dvar,) = torch.autograd.grad(process.sigma(t).pow(2).sum(), t)
    torch.testing.assert_close(process.diffusion(t.detach()) ** 2, dvar)


def test_dsm_loss_with_the_exact_score_matches_its_closed_form():
    """With the exact score, DSM = 1/2 E[sigma^2 ||eps/sigma||^2 - sigma^2 ||s||^2] per level.

    For N(mu, s^2 I) in d dimensions that is d/2 * s^2 / (s^2 + sigma^2) (Vincent 2011: DSM and
    explicit score matching differ by a constant, and explicit score matching is 0 here).
    """
    torch.manual_seed(0)
    d, s, n = 16, 0.7, 40_000
    process = VE(sigma_min=0.05, sigma_max=5.0, num_levels=6)
    mu = torch.randn(1, 4, 4)
    model = ScoreModel(process, ExactGaussianEps(process, mu, s))
    x0 = mu + s * torch.randn(n, 1, 4, 4)
    generator = torch.Generator().manual_seed(1)
    loss = DenoisingScoreMatching().loss(model, x0, generator).item()
    sig2 = process.levels().pow(2)
    expected = (0.5 * d * s**2 / (s**2 + sig2)).mean().item()
    # per-example loss is 1/2 * chi^2-like with variance <= d/2; 6 standard errors
    tolerance = 6 * math.sqrt(d / 2 / n) + 0.5 * d * (s**2) * 0.05  # + level-sampling noise
    assert abs(loss - expected) < tolerance, (loss, expected)
    wrong = DenoisingScoreMatching(weighting="none").loss(model, x0, generator).item()
    assert abs(wrong - expected) > tolerance, "the weighting must matter"


@pytest.mark.parametrize("denoise", [False, True])
def test_annealed_langevin_matches_the_exact_linear_gaussian_recursion(denoise):
    """For a Gaussian target every Langevin step is linear: var' = a^2 var + alpha with
    a = 1 - alpha / (2 v_i), v_i = s^2 + sigma_i^2. Iterating that recursion is an independent
    route to the sampler's output variance; the mean must end at mu."""
    torch.manual_seed(0)
    s, n = 0.5, 4000
    process = VE(sigma_min=0.01, sigma_max=4.0, num_levels=8)
    mu = torch.full((1, 4, 4), 0.3)
    model = ScoreModel(process, ExactGaussianEps(process, mu, s))
    solver = AnnealedLangevin(steps_per_level=30, epsilon=5e-5, denoise=denoise)
    samples = solver.sample(model, (n, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    x = samples.samples

    sigmas = process.levels().tolist()
    var = sigmas[0] ** 2  # x starts at the prior N(0, sigma_max^2)
    mean_scale = 1.0      # E[x] = mu * (1 - mean_scale)
    for sigma in sigmas:
        alpha = 5e-5 * sigma**2 / sigmas[-1] ** 2
        v = s**2 + sigma**2
        a = 1 - alpha / (2 * v)
        for _ in range(30):
            var = a * a * var + alpha
            mean_scale *= a
    if denoise:
        a = 1 - sigmas[-1] ** 2 / (s**2 + sigmas[-1] ** 2)
        var, mean_scale = a * a * var, mean_scale * a
    flat = x.flatten(1)
    m = n * flat.shape[1]
    sample_var = flat.var(0).mean().item()
    assert abs(sample_var - var) < 6 * var * math.sqrt(2 / m), (sample_var, var)
    expected_mean = 0.3 * (1 - mean_scale)
    assert abs(flat.mean().item() - expected_mean) < 6 * math.sqrt(var / m)
    assert samples.nfe == 8 * 30 + int(denoise)


def test_sliced_wasserstein_of_a_shift_is_its_length_over_sqrt_d():
    """A shift by c moves each 1-D projection by theta.c: SWD^2 = E(theta.c)^2 = |c|^2 / d."""
    g = torch.Generator().manual_seed(0)
    d = 10
    a = torch.randn(500, d, generator=g)
    c = torch.randn(d, generator=g)
    directions = random_directions(d, 20_000, g)
    swd = sliced_wasserstein(a, a + c, directions)
    expected = c.norm().item() / math.sqrt(d)
    # E[(theta.c)^2] over 20k directions: relative error of the mean ~ sqrt(2/(d+2)/20k)
    assert swd == pytest.approx(expected, rel=0.03)
    assert sliced_wasserstein(a, a, directions) == 0.0
    with pytest.raises(ValueError):
        sliced_wasserstein(a, a[:10], directions)

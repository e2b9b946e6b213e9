"""Per-sample random streams, given start noise, and cached schedule tables.

* :class:`PerSampleNoise` draws standard normals (moments and a KS bound), independent between
  draws and samples, and the same numbers for sample ``i`` whatever batch it sits in;
* ``Diffusion.sample`` gives identical samples for n = 64 in one batch and in chunks of 7;
* ``x_T`` replaces the prior draw (solver and ``Diffusion`` level);
* a second ``sample()`` with the same settings does no schedule work: the sampler's process is
  not asked for a single marginal / log-SNR / transition.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import DDPM, VE, VP
from diffusers_kit.solvers import (
    DDIM,
    Ancestral,
    AncestralPredictor,
    DPMSolver2M,
    DPMSolver3M,
    EDMStochastic,
    EulerODE,
    HeunODE,
    PerSampleNoise,
    PredictorCorrector,
)
from tests.gaussian_mixture import ExactScoreNetwork, exact_model, three_modes

MIXTURE = three_modes()


def test_per_sample_noise_is_standard_normal_and_independent():
    noise = PerSampleNoise(seed=3)
    first = noise.randn((20000, 3)).double()
    second = noise.randn((20000, 3)).double()
    for z in (first, second):
        n = z.numel()
        assert abs(float(z.mean())) < 6 / math.sqrt(n)
        assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
        assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-6
    # draws, samples and elements do not repeat each other
    for a, b in ((first, second), (first[:10000], first[10000:]), (first[:, 0], first[:, 1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(r)) < 6 / math.sqrt(a.numel())
    other_seed = PerSampleNoise(seed=4).randn((20000, 3)).double()
    assert not torch.equal(other_seed, first)


def test_per_sample_noise_ignores_the_batch():
    whole = PerSampleNoise(seed=9)
    draws = [whole.randn((64, 5)) for _ in range(3)]
    for first in range(0, 64, 7):
        rows = min(7, 64 - first)
        chunk = PerSampleNoise(seed=9, first=first)
        for draw in draws:
            assert torch.equal(chunk.randn((rows, 5)), draw[first:first + rows])


STOCHASTIC = [
    ("ancestral", lambda: Ancestral(steps=20), DDPM),
    ("ddim-eta", lambda: DDIM(steps=15, eta=0.7), DDPM),
    ("pc-ancestral", lambda: PredictorCorrector(AncestralPredictor(), steps=20), VP),
    ("edm-stochastic", lambda: EDMStochastic(steps=10), VP),
    ("dpm-solver-3m", lambda: DPMSolver3M(steps=10), VP),
]


@pytest.mark.parametrize(("make", "process"), [(m, p) for _, m, p in STOCHASTIC],
                         ids=[n for n, _, _ in STOCHASTIC])
def test_sample_i_is_the_same_in_one_batch_and_in_chunks_of_seven(make, process):
    diffusion = Diffusion(process(), ExactScoreNetwork(MIXTURE, process()), device="cpu")
    whole = diffusion.sample(64, make(), seed=5)
    chunked = diffusion.sample(64, make(), seed=5, batch_size=7)
    torch.testing.assert_close(chunked.samples, whole.samples, rtol=0, atol=1e-6)
    other = diffusion.sample(64, make(), seed=6)
    assert (other.samples - whole.samples).abs().max() > 1e-2


def test_start_noise_replaces_the_prior_draw():
    process = VP()
    model = exact_model(MIXTURE, process)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    # a deterministic solver from x_T equals the same solver whose prior draw was x_T
    ours = DPMSolver2M(steps=8).sample(model, (32, 2), x_T=x_T).samples
    replay = DPMSolver2M(steps=8).sample(model, (32, 2),
                                         generator=torch.Generator().manual_seed(1)).samples
    torch.testing.assert_close(ours, replay)
    diffusion = Diffusion(process, ExactScoreNetwork(MIXTURE, VP()), device="cpu")
    torch.testing.assert_close(diffusion.sample(32, DPMSolver2M(steps=8), x_T=x_T,
                                                batch_size=5).samples, ours)
    with pytest.raises(ValueError, match="x_T"):
        diffusion.sample(31, DPMSolver2M(steps=8), x_T=x_T)


class CountingVP(VP):
    """VP that counts how often its schedule is evaluated."""

    calls = 0

    def marginal(self, t):  # type: ignore[no-untyped-def]
        CountingVP.calls += 1
        return super().marginal(t)

    def log_snr(self, t):  # type: ignore[no-untyped-def]
        CountingVP.calls += 1
        return super().log_snr(t)

    def log_alpha(self, t):  # type: ignore[no-untyped-def]
        CountingVP.calls += 1
        return super().log_alpha(t)


SOLVERS = [
    ("ddim", lambda: DDIM(steps=10)),
    ("ancestral", lambda: Ancestral(steps=10)),
    ("pc", lambda: PredictorCorrector(steps=10)),
    ("euler-edm", lambda: EulerODE(steps=10, spacing="edm")),
    ("heun", lambda: HeunODE(steps=6)),
    ("dpm-solver-2m", lambda: DPMSolver2M(steps=10)),
    ("dpm-solver-3m", lambda: DPMSolver3M(steps=10)),
    ("edm-stochastic", lambda: EDMStochastic(steps=6)),
]


@pytest.mark.parametrize("make", [m for _, m in SOLVERS], ids=[n for n, _ in SOLVERS])
def test_second_sample_does_no_schedule_work(make):
    process = CountingVP()
    model = ScoreModel(process, ExactScoreNetwork(MIXTURE, VP()))  # the network has its own
    solver = make()
    first = solver.sample(model, (16, 2), generator=torch.Generator().manual_seed(0))
    assert CountingVP.calls > 0
    CountingVP.calls = 0
    second = make().sample(model, (16, 2), generator=torch.Generator().manual_seed(0))
    assert CountingVP.calls == 0
    torch.testing.assert_close(first.samples, second.samples)


def test_tables_are_per_process_and_settings():
    """A different grid or process gets its own table (no stale reuse)."""
    model_a = exact_model(MIXTURE, VE(sigma_min=0.01, sigma_max=20.0))
    model_b = exact_model(MIXTURE, VE(sigma_min=0.05, sigma_max=20.0))
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)) * 20
    a = DDIM(steps=10).sample(model_a, (8, 2), x_T=x_T).samples
    b = DDIM(steps=10).sample(model_b, (8, 2), x_T=x_T).samples
    c = DDIM(steps=11).sample(model_a, (8, 2), x_T=x_T).samples
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4

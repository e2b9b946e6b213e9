"""Sampler updates checked against independent routes: the papers' own formulas from the DDPM
beta table, and identities between samplers (DDIM eta=1 = ancestral, DDIM eta=0 = Euler)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.processes import DDPM, VP
from diffusers_kit.solvers import (
    DDIM,
    Ancestral,
    DPMSolver2M,
    EulerODE,
    HeunODE,
    PredictorCorrector,
    Record,
    ReverseDiffusion,
    ScipyODE,
)
from tests.gaussian_mixture import exact_model, three_modes

MIXTURE = three_modes()
SHAPE = (64, 2)


def _ho_chain(process: DDPM, model: ScoreModel, variance: str, seed: int) -> torch.Tensor:
    """Ho et al. 2020, Algorithm 2, written from the beta table alone."""
    gen = torch.Generator().manual_seed(seed)
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)
    x = torch.randn(SHAPE, generator=gen)
    T = process.num_steps
    for i in range(T, 0, -1):
        beta, a_bar = float(betas[i - 1]), float(abar[i - 1])
        a_bar_prev = float(abar[i - 2]) if i > 1 else 1.0
        eps = model.eps(x, torch.full((SHAPE[0],), i / T))
        mean = (x - beta / math.sqrt(1 - a_bar) * eps) / math.sqrt(1 - beta)
        if i > 1:
            var = beta if variance == "transition" else (1 - a_bar_prev) / (1 - a_bar) * beta
            x = mean + math.sqrt(var) * torch.randn(SHAPE, generator=gen)
        else:
            x = mean
    return x


@pytest.mark.parametrize("variance", ["posterior", "transition"])
def test_ancestral_is_ho_algorithm_2(variance):
    process = DDPM(num_steps=50)
    model = exact_model(MIXTURE, process)
    ours = Ancestral(variance=variance).sample(model, SHAPE,
                                               generator=torch.Generator().manual_seed(0))
    theirs = _ho_chain(process, model, variance, 0)
    torch.testing.assert_close(ours.samples, theirs, rtol=1e-4, atol=1e-4)
    assert ours.nfe == 50


def test_reverse_diffusion_predictor_is_song_eq_46():
    """x_{i-1} = (2 - sqrt(1 - beta_i)) x_i + beta_i s(x_i, i) + sqrt(beta_i) z for DDPM/VP."""
    process = DDPM(num_steps=40)
    model = exact_model(MIXTURE, process)
    ours = PredictorCorrector(ReverseDiffusion()).sample(
        model, SHAPE, generator=torch.Generator().manual_seed(1)).samples
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen)
    for i in range(40, 0, -1):
        beta = float(process.betas[i - 1])
        score = model.score(x, torch.full((SHAPE[0],), i / 40))
        x = (2 - math.sqrt(1 - beta)) * x + beta * score
        if i > 1:
            x = x + math.sqrt(beta) * torch.randn(SHAPE, generator=gen)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddim_eta_one_is_ancestral_sampling_on_the_same_sub_sequence():
    process = DDPM()
    model = exact_model(MIXTURE, process)
    ddim = DDIM(steps=25, eta=1.0).sample(model, SHAPE, generator=torch.Generator().manual_seed(2))
    ancestral = Ancestral(steps=25).sample(model, SHAPE,
                                           generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ddim.samples, ancestral.samples, rtol=1e-4, atol=1e-4)
    assert ddim.nfe == ancestral.nfe == 25


def test_ddim_eta_zero_is_euler_on_the_probability_flow_in_x_over_alpha():
    process = VP()
    model = exact_model(MIXTURE, process)
    ddim = DDIM(steps=12).sample(model, SHAPE, generator=torch.Generator().manual_seed(3))
    euler = EulerODE(steps=12, spacing="uniform").sample(
        model, SHAPE, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim.samples, euler.samples, rtol=1e-4, atol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_different_from_eta_one():
    model = exact_model(MIXTURE, DDPM())
    x1 = DDIM(steps=10).sample(model, SHAPE, generator=torch.Generator().manual_seed(4)).samples
    x2 = DDIM(steps=10).sample(model, SHAPE, generator=torch.Generator().manual_seed(4)).samples
    x3 = DDIM(steps=10, eta=1.0).sample(model, SHAPE,
                                        generator=torch.Generator().manual_seed(4)).samples
    assert torch.equal(x1, x2)
    assert (x1 - x3).abs().max() > 1e-2


class LearnedVariance(Network):
    """Exact eps plus a constant variance output v (Nichol & Dhariwal 2021)."""

    def __init__(self, inner: Network, v: float) -> None:
        super().__init__("eps")
        self.learned_variance = True
        self.inner, self.v = inner, v
        self.data_shape = inner.data_shape

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        eps = self.inner(x, t)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "transition"), (-1.0, "posterior")])
def test_learned_variance_interpolates_between_beta_and_beta_tilde(v, fixed):
    process = DDPM(num_steps=30)
    exact = exact_model(MIXTURE, process)
    learned = ScoreModel(process, LearnedVariance(exact.network, v))
    a = Ancestral(variance="learned").sample(learned, SHAPE,
                                             generator=torch.Generator().manual_seed(5))
    b = Ancestral(variance=fixed).sample(exact, SHAPE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="learned_variance"):
        Ancestral(variance="learned").sample(exact, SHAPE)


def test_nfe_counts_and_recording():
    model = exact_model(MIXTURE, VP())
    gen = torch.Generator().manual_seed(6)
    assert HeunODE(steps=7).sample(model, SHAPE, generator=gen).nfe == 13
    assert DPMSolver2M(steps=7).sample(model, SHAPE, generator=gen).nfe == 7
    before = model.nfe
    result = ScipyODE().sample(model, SHAPE, generator=gen)
    assert result.nfe == model.nfe - before > 10
    recorded = DPMSolver2M(record=Record(what=("x", "x0"), snapshots=5)).sample(
        model, SHAPE, generator=gen)
    assert len(recorded.trajectory) == len(recorded.x0_predictions) == len(recorded.times) == 5
    assert recorded.times[0] == 1.0 and recorded.times == sorted(recorded.times, reverse=True)
    # the last x0 prediction is (nearly) the sample itself: the last step lands on x0_hat
    torch.testing.assert_close(recorded.x0_predictions[-1], recorded.samples)


def test_deprecated_recording_names_still_work_and_warn():
    model = exact_model(MIXTURE, VP())
    with pytest.warns(DeprecationWarning, match="record"):
        solver = DDIM(steps=6, keep_x0=True, snapshots=3)
    assert solver.record == Record(what=("x0",), snapshots=3)
    result = solver.sample(model, SHAPE, generator=torch.Generator().manual_seed(7))
    assert len(result.x0_predictions) == 3 and result.trajectory == []
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        DDIM(record=Record(), keep_x0=True)


def test_power_spacing_is_the_quadratic_grid_with_exponent_rho():
    """``power``: ``t_i = t_min + (1 - t_min) (1 - i / (N - 1))^rho`` then 0, written out here;
    ``rho = 2`` is ``quadratic``; DDPM snaps it to the chain's steps like every spacing."""
    from diffusers_kit.solvers.grids import sampling_times

    process = VP()
    for rho in (2.0, 2.5, 4.0):
        i = torch.arange(12, dtype=torch.float64)
        expected = process.t_min + (1 - process.t_min) * (1 - i / 11) ** rho
        times = sampling_times(process, 12, "power", rho)
        torch.testing.assert_close(times[:-1], expected, rtol=0, atol=1e-15)
        assert times[-1] == 0
    torch.testing.assert_close(sampling_times(process, 12, "power", 2.0),
                               sampling_times(process, 12, "quadratic"))
    ddpm = sampling_times(DDPM(), 20, "power", 2.5)
    assert torch.equal(ddpm * 1000, torch.round(ddpm * 1000)), ddpm


def test_power_spacing_beats_quadratic_for_third_order_unipc_at_20_nfe():
    """The benchmark's finding (docs/solvers_benchmark.md) on a smaller draw: on DDPM's exact
    three-mode score, UniPC order 3 with 20 points errs 0.0048 on ``power`` (rho = 2.5) against
    0.0099 on ``quadratic`` (the default) (N = 1000, seed 100)."""
    from diffusers_kit.solvers import UniPC
    from diffusers_kit.testing import ODEReference

    process = DDPM()
    model = exact_model(MIXTURE, process)
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(100))
    reference = ODEReference(model, x_T)
    power = reference.error(UniPC(steps=20, order=3, spacing="power", rho=2.5))
    quadratic = reference.error(UniPC(steps=20, order=3, spacing="quadratic"))
    assert power < 0.7 * quadratic, (power, quadratic)

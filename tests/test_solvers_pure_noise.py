"""Samplers on a path that reaches pure noise, ``alpha(1) = 0``.

The process is rectified flow's straight path ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2022;
Lipman et al. 2022), written here as a minimal :class:`NoiseProcess` for this test only (the
flow-matching process proper, with its objective, is issue 26's). At ``t = 1`` the state is pure
noise: the score there is ``-x`` whatever the data, so an ``eps`` or ``score`` network cannot say
anything about ``x0`` and a step that divides by ``alpha`` is undefined. The network here
predicts ``x0`` exactly (:meth:`ExactMixture.denoise`, the mixture's mean at ``t = 1``).

Every ODE solver and the stochastic samplers that step on ``x0_hat`` (ancestral, DDIM with eta,
EDM's churn) land on the exact mixture (sliced Wasserstein distance within 1.5x the noise floor of
exact samples, fixed seeds). Predictor-corrector sampling cannot: the reverse SDE's drift
``f = alpha' / alpha`` is infinite at ``t = 1`` and its predictors form ``x0_hat`` from the score;
it refuses the process by name, as does Heun's ``noise`` form (``y = x / alpha``).
"""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes.base import NoiseProcess, expand
from diffusers_kit.solvers import (
    DDIM,
    Ancestral,
    DPMSolver2M,
    DPMSolver3M,
    EDMStochastic,
    EulerODE,
    HeunODE,
    PredictorCorrector,
    ScipyODE,
    UniPC,
)
from diffusers_kit.solvers.ode import combine
from diffusers_kit.testing import ExactScoreNetwork, MixtureTarget, three_modes

N = 2000
MIXTURE = three_modes()
TARGET = MixtureTarget(MIXTURE, N)


class RectifiedFlow(NoiseProcess):
    """``alpha = 1 - t``, ``sigma = t``: the SDE ``f = -1 / (1 - t)``, ``g^2 = 2 t / (1 - t)``
    (infinite at ``t = 1``), the rates ``alpha' = -1``, ``sigma' = 1`` stated directly."""

    t_min = 1e-3
    default_spacing = "quadratic"  # dense near t_min, where lambda = log((1 - t) / t) runs off

    def alpha(self, t):  # type: ignore[no-untyped-def]
        return 1.0 - t

    def sigma(self, t):  # type: ignore[no-untyped-def]
        return t

    def drift(self, x, t):  # type: ignore[no-untyped-def]
        return expand(-1.0 / (1.0 - t), x) * x

    def diffusion(self, t):  # type: ignore[no-untyped-def]
        return (2.0 * t / (1.0 - t)).sqrt()

    def prior_std(self) -> float:
        return 1.0

    def marginal_rates(self, t):  # type: ignore[no-untyped-def]
        return -torch.ones_like(t), torch.ones_like(t)


PROCESS = RectifiedFlow()


def model() -> ScoreModel:
    return ScoreModel(PROCESS, ExactScoreNetwork(MIXTURE, PROCESS, prediction="x0"))


#: the ODE solvers at the budgets these paths are checked at (tests/test_flow.py too)
ODE_SOLVERS = [
    ("euler", lambda: EulerODE(steps=100)),
    ("heun", lambda: HeunODE(steps=30)),
    ("dpm_solver_2m", lambda: DPMSolver2M(steps=30)),
    ("dpm_solver_3m", lambda: DPMSolver3M(steps=30)),
    ("unipc", lambda: UniPC(steps=30)),
    ("unipc-3", lambda: UniPC(steps=30, order=3)),
    ("scipy_ode", lambda: ScipyODE()),
]

SOLVERS = [
    *ODE_SOLVERS,
    ("ancestral", lambda: Ancestral(steps=200)),
    ("ddim-eta-1", lambda: DDIM(steps=100, eta=1.0)),
    ("ddim-eta-0.5", lambda: DDIM(steps=100, eta=0.5)),
    ("edm_stochastic", lambda: EDMStochastic(steps=40, S_churn=10.0)),
]


@pytest.mark.parametrize("make", [m for _, m in SOLVERS], ids=[n for n, _ in SOLVERS])
def test_every_solver_that_steps_on_x0_samples_a_path_from_pure_noise(make):
    """Through ``Diffusion.sample``, from the start noise :func:`check_solver_on_mixture` uses
    (an ODE maps its start noise deterministically, so the start's own sampling error is all
    the ODE samples carry: the same start as the kit's check keeps the bar the kit's)."""
    diffusion = Diffusion(PROCESS, ExactScoreNetwork(MIXTURE, PROCESS, prediction="x0"),
                          device="cpu")
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(3))
    samples = diffusion.sample(N, make(), seed=3, x_T=x_T).samples
    assert torch.isfinite(samples).all()
    assert TARGET.ratio(samples) < 1.5


def test_the_check_has_power_on_this_path():
    """Too few steps, or the prior itself, is far from the mixture."""
    prior = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    assert TARGET.ratio(prior) > 5
    few = EulerODE(steps=2).sample(model(), (N, 2), generator=torch.Generator().manual_seed(0))
    assert TARGET.ratio(few.samples) > 1.5


def test_the_first_step_from_pure_noise_is_the_data_form():
    """From ``t = 1`` (``alpha = 0``, ``sigma = 1``) Euler's step is ``x' = sigma' x + alpha'
    E[x0]``: ``E[x0 | x_1]`` is the mixture's mean, whatever ``x_1``."""
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = EulerODE(steps=4).cached_grid(PROCESS)
    m = model().predict(x, torch.ones(8, dtype=torch.float64), "x0", marginal=grid.marginal(0, x))
    mean = (MIXTURE.weights[:, None] * MIXTURE.means).sum(0)
    torch.testing.assert_close(m, mean.expand(8, 2))
    t1 = grid.t[1]
    torch.testing.assert_close(combine(x, grid, 0, [m], [1.0]), t1 * x + (1 - t1) * mean)


@pytest.mark.parametrize("make", [lambda: PredictorCorrector(steps=50),
                                  lambda: HeunODE(form="noise"),
                                  lambda: EDMStochastic(form="noise")])
def test_what_cannot_start_from_pure_noise_says_so(make):
    with pytest.raises(ValueError, match="alpha"):
        Diffusion(PROCESS, ExactScoreNetwork(MIXTURE, PROCESS, prediction="x0"),
                  device="cpu").sample(10, make())

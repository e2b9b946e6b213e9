"""The ``flow`` process (rectified flow's line and the cosine path, both ending in pure noise),
its ``velocity`` parameterisation, and the flow-matching objective.

Each identity is checked against an independent route: the contract checks of the testing kit,
the marginal against the iterated chain of exact transitions (Monte Carlo, six-sigma bounds),
the probability-flow velocity of the exact mixture against the continuity equation (autograd of
the path's density in ``t`` and ``x``), every ODE solver against exact mixture samples, and the
flow-matching objective's optimum against the closed-form velocity of Gaussian data (the
expectation over the data and the noise is exact by Gauss-Hermite quadrature).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.objectives import FlowMatching
from diffusers_kit.objectives.denoising import draw_times
from diffusers_kit.processes import VE, VP, Flow
from diffusers_kit.registry import get_registry
from diffusers_kit.testing import (
    ExactScoreNetwork,
    MixtureTarget,
    Z,
    assert_rates_match_marginal,
    check_process,
    check_registered,
    three_modes,
)
from tests.test_solvers_pure_noise import ODE_SOLVERS

PATHS = ["linear", "cosine"]
MIXTURE = three_modes()
N = 2000


@pytest.mark.parametrize("path", PATHS)
def test_the_contract_checks_pass(path):
    check_process(Flow(path=path))


@pytest.mark.parametrize("path", PATHS)
def test_the_path_ends_in_pure_noise_and_starts_at_the_data(path):
    alpha, sigma = Flow(path=path).marginal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha.tolist() == [1.0, 0.0] and sigma.tolist() == [0.0, 1.0]


def test_the_coefficients_are_the_papers():
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    line, cosine = Flow(), Flow(path="cosine")
    torch.testing.assert_close(line.alpha(t), 1 - t)
    torch.testing.assert_close(line.sigma(t), t)
    torch.testing.assert_close(cosine.alpha(t), torch.cos(math.pi * t / 2))
    torch.testing.assert_close(cosine.sigma(t), torch.sin(math.pi * t / 2))
    inner = t[1:-1]  # the SDE (Kingma et al. 2021, eq. 3): f = alpha' / alpha, g^2 = ...
    torch.testing.assert_close(line.diffusion(inner) ** 2, 2 * inner / (1 - inner))
    torch.testing.assert_close(cosine.diffusion(inner) ** 2,
                               math.pi * torch.tan(math.pi * inner / 2))


def test_the_rate_check_has_power():
    """A cosine path whose rates lack the factor pi / 2 fails the kit's rate check."""

    class Wrong(Flow):
        def marginal_rates(self, t):  # type: ignore[no-untyped-def]
            return -self.sigma(t), self.alpha(t)

    with pytest.raises(AssertionError, match="marginal_rates"):
        assert_rates_match_marginal(Wrong(path="cosine"), (0.5,))


@pytest.mark.parametrize("path", PATHS)
def test_the_iterated_chain_has_the_marginal(path):
    """``x0 -> x_{t_1} -> ... -> x_t`` by exact transitions over 40 steps has mean ``alpha(t)
    x0`` and variance ``sigma(t)^2`` (z-bounds 6 for 20,000 chains), and at ``t = 1`` forgets
    ``x0``: ``N(0, 1)`` whatever it was."""
    process = Flow(path=path)
    generator = torch.Generator().manual_seed(0)
    n, x0 = 20_000, 1.7
    times = torch.linspace(0, 1, 41, dtype=torch.float64)
    x = torch.full((n, 1), x0, dtype=torch.float64)
    for k in range(1, 41):
        s, t = times[k - 1].expand(n), times[k].expand(n)
        x = process.transition_sample(x, s, t, torch.randn(n, 1, generator=generator,
                                                              dtype=torch.float64))
        if k in (10, 25, 40):
            alpha, sigma = (c.item() for c in process.marginal(times[k:k + 1]))
            mean, var = x.mean().item(), x.var().item()
            assert abs(mean - alpha * x0) <= Z * sigma / math.sqrt(n)
            assert abs(var - sigma**2) <= Z * sigma**2 * math.sqrt(2 / (n - 1))
    assert abs(x.mean().item()) <= Z / math.sqrt(n)  # x0 = 1.7 is gone at t = 1


@pytest.mark.parametrize("path", PATHS)
def test_the_velocity_of_the_mixture_satisfies_the_continuity_equation(path):
    """``E[u | x_t]`` (the exact x0 of the mixture converted to ``velocity``) transports the
    path's density: ``d/dt log q_t + div u + u . grad log q_t = 0``, with ``d/dt`` through
    autograd of ``alpha(t)``, ``sigma(t)`` and the divergence by autograd in ``x``."""
    process = Flow(path=path)
    network = ExactScoreNetwork(MIXTURE, process, prediction="x0")
    model = ScoreModel(process, network)
    generator = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
    for t_value in (0.2, 0.5, 0.9):
        t = torch.full((64,), t_value, dtype=torch.float64, requires_grad=True)
        alpha, sigma = process.marginal(t)
        log_q = MIXTURE.log_prob(x, alpha, sigma)
        d_dt = torch.autograd.grad(log_q.sum(), t)[0]
        xr = x.clone().requires_grad_(True)
        tt = torch.full((64,), t_value, dtype=torch.float64)
        u = model.predict(xr, tt, "velocity")
        div = sum(torch.autograd.grad(u[:, i].sum(), xr, retain_graph=True)[0][:, i]
                  for i in range(2))
        score = MIXTURE.score(x, *process.marginal(tt))
        residual = d_dt + div + (u.detach() * score).sum(1)
        assert residual.abs().max() < 1e-8, (t_value, residual.abs().max())


@pytest.mark.parametrize("process", [Flow(), Flow(path="cosine"), VP(), VE()],
                         ids=["linear", "cosine", "vp", "ve"])
def test_the_velocity_is_the_probability_flow_drift(process):
    """Below ``t = 1``: ``E[u | x_t] = f x - g^2 score / 2`` (Song et al. 2021, eq. 13) from the
    exact score, on any process; and on a path to pure noise, at ``t = 1``: ``u = sigma'(1) x +
    alpha'(1) E[x0]``."""
    model = ScoreModel(process, ExactScoreNetwork(MIXTURE, process, prediction="x0"))
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.full((32,), 0.6, dtype=torch.float64)
    score = MIXTURE.score(x, *process.marginal(t))
    torch.testing.assert_close(model.predict(x, t, "velocity"),
                               process.probability_flow_drift(x, t, score))
    if not isinstance(process, Flow):
        return
    one = torch.ones(32, dtype=torch.float64)
    d_alpha, d_sigma = process.marginal_rates(one)
    mean = (MIXTURE.weights[:, None] * MIXTURE.means).sum(0)
    torch.testing.assert_close(model.predict(x, one, "velocity"),
                               d_sigma[:, None] * x + d_alpha[:, None] * mean)


def test_velocity_and_ddpm_v_are_different_targets():
    """At fixed ``x_t``: ``u = (a a' + s s') / (a^2 + s^2) x_t + (a s' - s a') / (a^2 + s^2) v``;
    on the cosine path ``u = (pi / 2) v``; on the line they are not proportional."""
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    t = torch.rand(5, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    for process in (Flow(), Flow(path="cosine"), VP()):
        x_t, _ = process.marginal_sample(x0, t, eps)
        alpha, sigma = (c[:, None] for c in process.marginal(t))
        d_alpha, d_sigma = (c[:, None] for c in process.marginal_rates(t))
        v = alpha * eps - sigma * x0
        u = process.convert(v, x_t, t, "v", "velocity")
        norm = alpha**2 + sigma**2
        torch.testing.assert_close(u, d_alpha * x0 + d_sigma * eps)
        torch.testing.assert_close(u, ((alpha * d_alpha + sigma * d_sigma) * x_t
                                       + (alpha * d_sigma - sigma * d_alpha) * v) / norm)
    cosine = Flow(path="cosine")
    x_t, _ = cosine.marginal_sample(x0, t, eps)
    v = cosine.convert(eps, x_t, t, "eps", "v")
    torch.testing.assert_close(cosine.convert(v, x_t, t, "v", "velocity"), math.pi / 2 * v)
    line = Flow()
    x_t, _ = line.marginal_sample(x0, t, eps)
    ratio = line.convert(eps, x_t, t, "eps", "velocity") / line.convert(eps, x_t, t, "eps", "v")
    assert ratio.std() > 0.1


def test_x0_from_velocity_is_defined_at_pure_noise():
    """At ``t = 1`` (``alpha = 0``) ``x0 = x_t - u`` on the line; ``v = -x0`` there gives it too."""
    process = Flow()
    x0, eps = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(4),
                          dtype=torch.float64)
    t = torch.ones(4, dtype=torch.float64)
    x_t = eps
    torch.testing.assert_close(process.convert(eps - x0, x_t, t, "velocity", "x0"), x0)
    torch.testing.assert_close(process.convert(-x0, x_t, t, "v", "x0"), x0)


SOLVERS = ODE_SOLVERS


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
@pytest.mark.parametrize("make", [m for _, m in SOLVERS], ids=[n for n, _ in SOLVERS])
def test_every_ode_solver_lands_on_the_mixture(make, prediction, path):
    """The registered process, an exact network predicting the velocity (or x0), every ODE
    solver at its default spacing: SWD within 1.5x the noise floor of exact samples."""
    process = Flow(path=path)
    diffusion = Diffusion(process, ExactScoreNetwork(MIXTURE, process, prediction=prediction),
                          device="cpu")
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(3))
    samples = diffusion.sample(N, make(), seed=3, x_T=x_T).samples
    assert MixtureTarget(MIXTURE, N).ratio(samples) < 1.5


class Affine(Network):
    """``a x + b`` with ``(a, b) = coefficients`` (a plain tensor, so that the expected loss
    can be differentiated in it): at one time, the best such function is the exact
    conditional expectation for Gaussian data."""

    def __init__(self, prediction: str) -> None:
        super().__init__(prediction)
        self.coefficients = torch.zeros(2, dtype=torch.float64)

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        a, b = self.coefficients
        return a * x + b


def gauss_hermite_pairs(m: float, c: float, points: int = 5
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0, eps, weight)`` on a tensor grid of probabilists' Gauss-Hermite nodes: exact
    expectations over ``x0 ~ N(m, c^2)``, ``eps ~ N(0, 1)`` of polynomials of degree below
    ``2 points`` in each (the losses here are quadratic)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    weights = weights / weights.sum()
    z0, z1 = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)

    def column(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a.reshape(-1, 1), dtype=torch.float64)

    return m + c * column(z0), column(z1), column(w)[:, 0]


def exact_minimum(objective, model: ScoreModel, affine: Affine, t_value: float, m: float,
                  c: float) -> torch.Tensor:
    """The minimiser ``(a, b)`` of ``affine`` (inside ``model``'s network) for the objective's
    exact expected loss at one time for data
    ``N(m, c^2)``: the loss is quadratic in ``(a, b)``, so one Newton step from zero (autograd
    gradient and Hessian) lands on it."""
    x0, eps, weight = gauss_hermite_pairs(m, c)
    t = torch.full((len(weight),), t_value, dtype=torch.float64)

    def expected(values: torch.Tensor) -> torch.Tensor:
        affine.coefficients = values
        return (objective.per_example(model, x0, t, eps) * weight).sum()

    zero = torch.zeros(2, dtype=torch.float64)
    gradient = torch.autograd.functional.jacobian(expected, zero)
    hessian = torch.autograd.functional.hessian(expected, zero)
    best = zero - torch.linalg.solve(hessian, gradient)
    after = torch.autograd.functional.jacobian(expected, best)
    assert after.abs().max() < 1e-9  # quadratic: the gradient vanishes there
    return best


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t_value", [0.15, 0.5, 0.85])
def test_the_flow_matching_optimum_is_the_closed_form_velocity(path, t_value):
    """Data ``N(m, c^2)``: ``E[u | x_t] = alpha' E[x0 | x_t] + sigma' E[eps | x_t]`` with
    ``E[x0 | x] = m + alpha c^2 (x - alpha m) / (alpha^2 c^2 + sigma^2)`` and
    ``E[eps | x] = sigma (x - alpha m) / (alpha^2 c^2 + sigma^2)``."""
    m, c = 0.7, 1.3
    process = Flow(path=path)
    affine = Affine("velocity")
    model = ScoreModel(process, affine)
    a, b = exact_minimum(FlowMatching(), model, affine, t_value, m, c).tolist()
    t = torch.tensor([t_value], dtype=torch.float64)
    alpha, sigma = (v.item() for v in process.marginal(t))
    d_alpha, d_sigma = (v.item() for v in process.marginal_rates(t))
    norm = alpha**2 * c**2 + sigma**2
    slope = (d_alpha * alpha * c**2 + d_sigma * sigma) / norm
    intercept = d_alpha * m - slope * alpha * m
    assert math.isclose(a, slope, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(b, intercept, rel_tol=1e-9, abs_tol=1e-9)


def test_the_flow_matching_loss_is_the_velocity_error():
    """The objective's per-example loss equals ``mean || u_theta - (eps - x0) ||^2`` on the
    line, for a network predicting anything (here eps, converted)."""
    process = Flow()
    generator = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    network = Affine("eps")
    network.coefficients = torch.tensor([0.3, -0.2], dtype=torch.float64)
    model = ScoreModel(process, network)
    loss = FlowMatching().per_example(model, x0, t, eps)
    x_t, _ = process.marginal_sample(x0, t, eps)
    u_hat = process.convert(0.3 * x_t - 0.2, x_t, t, "eps", "velocity")
    torch.testing.assert_close(loss, ((u_hat - (eps - x0)) ** 2).mean(1))


def test_logit_normal_times():
    """``t = sigmoid(location + scale z)``: the logits of the draws have the location and scale
    asked (six-sigma bounds for 20,000 draws)."""
    n = 20_000
    t = draw_times(Flow(), n, "logit_normal", location=0.5, scale=0.8,
                   generator=torch.Generator().manual_seed(6)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) <= Z * 0.8 / math.sqrt(n)
    assert abs(logit.std().item() - 0.8) <= Z * 0.8 / math.sqrt(2 * (n - 1))
    assert t.max() < 1.0


def test_registered():
    assert isinstance(check_registered("process", "flow"), Flow)
    assert isinstance(check_registered("objective", "flow_matching"), FlowMatching)
    flow = get_registry().build("process", {"kind": "flow", "path": "cosine"})
    assert flow.path == "cosine"

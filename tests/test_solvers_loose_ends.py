"""The math loose ends of issue 13, each checked against an independent route.

* DDPM's rate ``beta(t)`` is left-continuous: at a grid time ``i / T`` it is step ``i``'s rate, the
  step a reverse move from ``i / T`` crosses (checked against the beta table and against
  ``-2 log alpha(1)`` from the marginal);
* every grid ends at noise level 0: on VE (``sigma(0) = sigma_min > 0``) the last step of the
  ancestral, DDIM and reverse-SDE samplers is Tweedie's denoising step, not a no-op;
* a learned variance at step 1 interpolates toward ``beta~_2`` (the clipped log variance of
  Nichol & Dhariwal 2021), so its gradient on ``v`` is not zero;
* ``variational_bound`` honours a learned variance;
* the likelihood's starting time is a parameter, with the paper's ``eps = 1e-5``.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.processes import DDPM, VE
from diffusers_kit.solvers import (
    DDIM,
    Ancestral,
    AncestralPredictor,
    EulerMaruyama,
    PredictorCorrector,
    Record,
    ReverseDiffusion,
)
from diffusers_kit.solvers.tables import step_table
from tests.gaussian_mixture import exact_model, three_modes

MIXTURE = three_modes()
SHAPE = (64, 2)


# -- DDPM rate at grid times -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddpm_rate_at_a_step_time_is_that_steps_rate(dtype):
    process = DDPM(num_steps=1000)
    steps = torch.arange(1, 1001)
    rate = process.beta((steps / 1000).to(dtype)).double()
    expected = -1000 * torch.log1p(-process.betas)  # step i's rate, from the beta table
    torch.testing.assert_close(rate, expected, rtol=1e-6, atol=0, check_dtype=False)
    # strictly inside step i the rate is step i's too
    inside = process.beta(((steps - 0.5) / 1000).to(dtype)).double()
    torch.testing.assert_close(inside, expected, rtol=1e-6, atol=0, check_dtype=False)


def test_reverse_sde_coefficients_integrate_the_rate_exactly():
    """On the full DDPM grid the reverse SDE's ``sum g(t_i)^2 dt_i`` is the exact integral of the
    piecewise-constant rate, ``-2 log alpha(1)``: every row reads the step it crosses."""
    process = DDPM(num_steps=50, beta_start=1e-3, beta_end=0.3)
    table = step_table(process, None).tensors
    total = float((table["g2"] * table["dt"]).sum())
    exact = float(-2 * torch.log(process.alpha(torch.ones(1, dtype=torch.float64))))
    assert total == pytest.approx(exact, rel=1e-9)


# -- every grid ends at noise level 0 --------------------------------------------------------
VE_SOLVERS = [
    ("ddim", lambda: DDIM(steps=8)),
    ("ancestral", lambda: Ancestral(steps=8)),
    ("pc-reverse-diffusion", lambda: PredictorCorrector(ReverseDiffusion(), steps=8)),
    ("pc-ancestral", lambda: PredictorCorrector(AncestralPredictor(), steps=8)),
    ("pc-euler-maruyama", lambda: PredictorCorrector(EulerMaruyama(), steps=8)),
]


@pytest.mark.parametrize("make", [m for _, m in VE_SOLVERS], ids=[n for n, _ in VE_SOLVERS])
def test_ve_last_step_denoises_to_noise_level_zero(make):
    """VE's last evaluation is at sigma_min > 0; the step after it must land on Tweedie's
    ``x + sigma_min^2 s(x, t_min)``, not stay at ``x`` (a wasted evaluation)."""
    process = VE(sigma_min=0.2, sigma_max=20.0)
    model = exact_model(MIXTURE, process)
    solver = make()
    solver.record = Record(what=("x",), snapshots=8)
    result = solver.sample(model, SHAPE, generator=torch.Generator().manual_seed(0))
    assert result.nfe == 8
    last_x, last_t = result.trajectory[-1], result.times[-1]
    t = torch.full((SHAPE[0],), last_t)
    sigma = float(process.sigma(torch.tensor(last_t)))
    tweedie = last_x + sigma**2 * model.score(last_x, t)
    torch.testing.assert_close(result.samples, tweedie, rtol=1e-4, atol=1e-4)
    assert (result.samples - last_x).abs().max() > 1e-2


# -- learned variance at step 1 --------------------------------------------------------------
class ConstantV(Network):
    """Exact eps plus a variance output ``v`` (Nichol & Dhariwal 2021), a learnable scalar."""

    def __init__(self, inner: Network, v: float) -> None:
        super().__init__("eps")
        self.learned_variance = True
        self.inner = inner
        self.v = torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
        self.data_shape = inner.data_shape

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        eps = self.inner(x, t)
        return torch.cat([eps, self.v.to(eps.dtype).expand_as(eps)], dim=1)


def test_learned_log_variance_at_step_one_uses_clipped_beta_tilde_two():
    from diffusers_kit.objectives.ddpm import reverse_log_variance

    process = DDPM(num_steps=20)
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)
    beta_tilde_2 = (1 - abar[0]) / (1 - abar[1]) * betas[1]  # Ho et al. 2020, eq. 7
    v = torch.full((1, 2), 0.3, dtype=torch.float64)
    t = torch.tensor([1 / 20], dtype=torch.float64)
    frac = (0.3 + 1) / 2
    expected = frac * math.log(betas[0]) + (1 - frac) * math.log(beta_tilde_2)
    got = reverse_log_variance(process, t, "learned", v)
    torch.testing.assert_close(got, torch.full_like(got, expected))


def test_hybrid_loss_trains_v_at_step_one():
    """With the clipped beta~_2 the decoder term depends on v at step 1: nonzero gradient."""
    from diffusers_kit.objectives.ddpm import HybridLoss

    process = DDPM(num_steps=20)
    network = ConstantV(exact_model(MIXTURE, process).network, 0.0)
    model = ScoreModel(process, network)
    x0 = MIXTURE.sample(32, torch.Generator().manual_seed(1)).clamp(-1, 1).double()
    t = torch.full((32,), 1 / 20, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = HybridLoss(vlb_weight=1.0, decoder_bins=None).per_example(
        model, x0, t, noise, index=torch.ones(32, dtype=torch.long)).mean()
    (grad,) = torch.autograd.grad(loss, network.v)
    assert abs(float(grad)) > 1e-3


# -- the variational bound honours a learned variance ----------------------------------------
@torch.no_grad()
def test_variational_bound_uses_the_learned_variance():
    from diffusers_kit.likelihood import variational_bound

    process = DDPM(num_steps=30)
    exact = exact_model(MIXTURE, process)
    x0 = MIXTURE.sample(16, torch.Generator().manual_seed(3)).clamp(-1, 1)

    def bound(model, variance):  # type: ignore[no-untyped-def]
        return variational_bound(model, x0, variance=variance, bins=None,
                                 generator=torch.Generator().manual_seed(4))

    upper = ScoreModel(process, ConstantV(exact.network, 1.0))  # v = 1: sigma^2 = beta
    lower = ScoreModel(process, ConstantV(exact.network, -1.0))  # v = -1: sigma^2 = beta~
    middle = ScoreModel(process, ConstantV(exact.network, 0.0))
    torch.testing.assert_close(bound(upper, "auto"), bound(exact, "transition"))
    # v = -1 is beta~ on every step but the decoder's, whose lower bound is beta~_2, not beta_1
    difference = bound(lower, "learned") - bound(exact, "posterior")
    generator = torch.Generator().manual_seed(4)  # replay the bound's draws to the last step
    for _ in range(30):
        noise = torch.randn(x0.shape, generator=generator)
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)
    beta_tilde_2 = float((1 - abar[0]) / (1 - abar[1]) * betas[1])
    x_1 = math.sqrt(abar[0]) * x0.double() + math.sqrt(1 - abar[0]) * noise.double()
    x0_hat = exact.predict(x_1.float(), torch.full((16,), 1 / 30), "x0").double()

    def decoder(var: float) -> torch.Tensor:
        return 0.5 * ((x0.double() - x0_hat) ** 2 / var + math.log(2 * math.pi * var)).sum(1)

    expected = decoder(beta_tilde_2) - decoder(float(betas[0]))
    torch.testing.assert_close(difference.double(), expected, rtol=1e-3, atol=1e-3)
    between = bound(middle, "auto")
    for fixed in ("transition", "posterior"):
        assert (between - bound(exact, fixed)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="learned_variance"):
        bound(exact, "learned")


# -- the likelihood's starting time ----------------------------------------------------------
def test_likelihood_start_time_is_a_parameter_with_the_papers_eps():
    """Data as narrow as an 8-bit bin: from VP's t_min (sigma ~ 0.01) the PF-ODE gives the density
    of q_{t_min}, ~0.8 nats/dim below the data's; from the paper's eps = 1e-5 (sigma ~ 1e-3) it
    is within 0.05 nats/dim of the data density. Both match their own q_t in closed form."""
    from diffusers_kit.likelihood import PAPER_EPS, log_likelihood
    from diffusers_kit.processes import VP
    from tests.gaussian_mixture import GaussianMixture

    narrow = GaussianMixture([1.0], [[0.2, -0.1]], [[0.005, 0.005]])
    process = VP()
    model = exact_model(narrow, process)
    x = narrow.sample(32, torch.Generator().manual_seed(5))
    data = narrow.log_prob(x)
    for t_start, t in ((None, process.t_min), ("paper", PAPER_EPS)):
        result = log_likelihood(model, x, t_start=t_start)
        alpha, sigma = process.marginal(torch.full((32,), t, dtype=torch.float64))
        q_t = narrow.log_prob(x, alpha, sigma)  # x taken as a sample of q_t
        assert ((result.log_prob - q_t).abs() / 2).max() < 0.01
        gap = ((data - result.log_prob) / 2).mean()
        assert (gap > 0.3) if t_start is None else (abs(gap) < 0.05), (t_start, gap)
    with pytest.raises(ValueError, match="continuous"):
        log_likelihood(exact_model(narrow, DDPM()), x, t_start="paper")

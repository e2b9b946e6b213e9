"""EDM preconditioning, the EDM loss and the weightings of ``objectives/denoising.py``.

Checked against Karras et al. 2022's Table 1 written out in the noise-level form, against the
ideal denoiser of Gaussian data (the exact optimum of the expected loss, by Gauss-Hermite
quadrature and one Newton step), and each weighting against the loss in its own target space.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import EDMPrecond
from diffusers_kit.networks.base import Network
from diffusers_kit.objectives import Denoising, EDMLoss
from diffusers_kit.objectives.denoising import draw_times
from diffusers_kit.processes import DDPM, VE, VP, Flow
from diffusers_kit.registry import get_registry
from diffusers_kit.testing import Z
from tests.test_flow import Affine, exact_minimum

PROCESSES = [VP(), VE(sigma_min=0.01, sigma_max=20.0), Flow(), Flow(path="cosine")]
IDS = ["vp", "ve", "flow", "flow-cosine"]


class Recorder(Network):
    """Returns ``F`` given and keeps what it was called with."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("eps")
        self.value = value

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        self.seen = (x, t)
        return self.value


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_the_coefficients_are_table_1(process):
    """``D = c_skip x / alpha + c_out F(c_in x / alpha, c_noise)`` with Table 1's
    coefficients of ``s = sigma / alpha``."""
    generator = torch.Generator().manual_seed(0)
    x, f = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    sd = 0.7
    inner = Recorder(f)
    wrapper = EDMPrecond(inner, sigma_data=sd)
    wrapper.bind_process(process)
    out = wrapper(x, t)
    alpha, sigma = (c[:, None] for c in process.marginal(t))
    s = sigma / alpha
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    c_noise = torch.log(s) / 4
    torch.testing.assert_close(inner.seen[0], c_in * x / alpha)
    torch.testing.assert_close(inner.seen[1], c_noise[:, 0])
    torch.testing.assert_close(out, c_skip * x / alpha + c_out * f)


def test_pure_noise_is_finite():
    """Where ``alpha = 0``: ``D = sigma_data F(x / sigma)``, and the noise input is clamped."""
    x, f = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inner = Recorder(f)
    wrapper = EDMPrecond(inner, sigma_data=0.5)
    wrapper.bind_process(Flow())
    out = wrapper(x, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out, 0.5 * f)
    torch.testing.assert_close(inner.seen[0], x)
    assert torch.isfinite(inner.seen[1]).all()


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_the_edm_optimum_is_the_ideal_denoiser(process, t_value):
    """For data ``N(m, c^2)`` the minimiser of the expected EDM loss at one time, through the
    preconditioning around an affine ``F``, is ``D(x) = m + c^2 / (c^2 + s^2) (x / alpha - m)``
    (Karras et al. 2022, eq. 3 for a Gaussian). ``D`` is affine in ``x`` whatever the
    coefficients (``c_out != 0``), so this checks the loss's target and its reach through the
    wrapper on every process; the coefficients themselves are checked against Table 1 above."""
    m, c = 0.4, 0.8
    inner = Affine("eps")
    model = ScoreModel(process, EDMPrecond(inner, sigma_data=0.5))
    a, b = exact_minimum(EDMLoss(), model, inner, t_value, m, c)
    inner.coefficients = torch.stack([a, b])
    t = torch.full((3,), t_value, dtype=torch.float64)
    x = torch.tensor([[-1.0], [0.2], [2.5]], dtype=torch.float64)
    alpha, sigma = (v[:, None] for v in process.marginal(t))
    s = sigma / alpha
    ideal = m + c**2 / (c**2 + s**2) * (x / alpha - m)
    torch.testing.assert_close(model.predict(x, t, "x0"), ideal, rtol=1e-8, atol=1e-8)


def test_bind_is_done_by_the_model_and_required():
    wrapper = EDMPrecond(Recorder(torch.zeros(1, 1)))
    with pytest.raises(RuntimeError, match="bind_process"):
        wrapper(torch.zeros(1, 1), torch.ones(1))
    ScoreModel(VP(), wrapper)
    assert isinstance(wrapper.process, VP)


@pytest.mark.parametrize("process", [VP(), Flow(), DDPM()], ids=["vp", "flow", "ddpm"])
def test_each_weighting_is_the_loss_in_its_own_space(process):
    """``w(t) mean ||x0_hat - x0||^2`` equals: ``eps``: ``mean ||eps_hat - eps||^2``; ``v``:
    ``mean ||v_hat - v||^2``; ``min_snr``: ``min(SNR, gamma) / SNR`` times the eps loss (Hang et
    al. 2023, eq. 12); ``p2``: ``(k + SNR)^-gamma`` times it (Choi et al. 2022); ``sigmoid``:
    ``sigmoid(b - log SNR)`` times it (Kingma & Gao 2023); ``edm``: ``(s^2 + sd^2) / (s sd)^2
    ||D - x0||^2``; ``x0``: the x0 loss."""
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    network = Affine("eps")
    network.coefficients = torch.tensor([0.4, 0.1], dtype=torch.float64)
    model = ScoreModel(process, network)
    x_t, _ = process.marginal_sample(x0, t, eps)
    eps_hat = 0.4 * x_t + 0.1
    alpha, sigma = (c[:, None] for c in process.marginal(t))
    x0_hat = (x_t - sigma * eps_hat) / alpha
    v, v_hat = alpha * eps - sigma * x0, alpha * eps_hat - sigma * x0_hat
    snr = (alpha / sigma)[:, 0] ** 2
    s = (sigma / alpha)[:, 0]

    def loss(**options):
        return Denoising(**options).per_example(model, x0, t, eps)

    mse = lambda a, b: ((a - b) ** 2).mean(1)  # noqa: E731
    torch.testing.assert_close(loss(weighting="eps"), mse(eps_hat, eps))
    torch.testing.assert_close(loss(weighting="x0"), mse(x0_hat, x0))
    torch.testing.assert_close(loss(weighting="v"), mse(v_hat, v))
    torch.testing.assert_close(loss(weighting="min_snr", gamma=2.0),
                               snr.clamp(max=2.0) / snr * mse(eps_hat, eps))
    torch.testing.assert_close(loss(weighting="p2", gamma=0.5, p2_k=1.0),
                               mse(eps_hat, eps) / (1.0 + snr) ** 0.5)
    log_snr = process.log_snr(t)
    torch.testing.assert_close(loss(weighting="sigmoid", bias=-1.0),
                               torch.sigmoid(-1.0 - log_snr) * mse(eps_hat, eps))
    torch.testing.assert_close(loss(weighting="edm", sigma_data=0.5),
                               (s**2 + 0.25) / (0.5 * s) ** 2 * mse(x0_hat, x0))


def test_min_snr_clips_only_above_gamma():
    """Where ``SNR < gamma`` Min-SNR is the eps loss itself; above, less."""
    process = VP()
    t = torch.tensor([0.05, 0.9], dtype=torch.float64)  # SNR ~ 33 and ~ 0.01
    from diffusers_kit.objectives.denoising import x0_weight

    clipped = x0_weight(process, t, "min_snr", gamma=5.0)
    eps = x0_weight(process, t, "eps")
    assert clipped[0] == 5.0 and eps[0] > 30
    assert clipped[1] == eps[1]


def test_log_normal_times_give_log_normal_levels():
    """``ln(sigma / alpha)`` at the drawn times has EDM's ``P_mean``, ``P_std`` (six-sigma
    bounds for 20,000 draws) on the flow's line, whose levels span ``(0, inf)``."""
    n = 20_000
    process = Flow()
    t = draw_times(process, n, "log_normal", location=-1.2, scale=1.2,
                   generator=torch.Generator().manual_seed(3)).double()
    alpha, sigma = process.marginal(t)
    log_level = torch.log(sigma / alpha)
    assert abs(log_level.mean().item() + 1.2) <= Z * 1.2 / math.sqrt(n) + 1e-4
    assert abs(log_level.std().item() - 1.2) <= Z * 1.2 / math.sqrt(2 * (n - 1)) + 1e-4


def test_edm_precond_builds_from_a_spec_mapping():
    network = get_registry().build("network", {"kind": "edm_precond", "sigma_data": 0.5,
                                               "network": {"kind": "unet", "channels": 8,
                                                           "channel_mult": [1],
                                                           "attention_resolutions": [],
                                                           "norm_groups": 4}},
                                   data_shape=(1, 8, 8))
    assert isinstance(network, EDMPrecond) and network.prediction == "x0"
    model = ScoreModel(Flow(), network)
    out = model.predict(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 0.3]), "x0")
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_the_loss_and_the_wrapper_share_sigma_data():
    wrapper = EDMPrecond(Recorder(torch.zeros(1, 1)), sigma_data=0.75)
    assert "sigma_data" in EDMLoss(sigma_data=0.5).check(VE(), wrapper)
    assert EDMLoss(sigma_data=0.75).check(VE(), wrapper) is None

"""First stages for latent diffusion (issue 12): the KL and VQ autoencoders, their objective and
their metric — shapes, the KL and VQ losses against independent routes, the latent scale, the
straight-through gradient, and that training reduces the reconstruction error."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusers_kit.autoencoders import Autoencoder, KLAutoencoder, VQAutoencoder
from diffusers_kit.autoencoders.kl import gaussian_kl
from diffusers_kit.data.base import DataSplits
from diffusers_kit.data.digits import Digits
from diffusers_kit.metrics.reconstruction import ReconstructionQuality
from diffusers_kit.networks.mlp import MLP
from diffusers_kit.objectives.reconstruction import Reconstruction
from diffusers_kit.registry import BUILTIN_SOURCE, get_registry
from tests.test_hardening_more import _unbounded

FAMILIES = {"kl": KLAutoencoder, "vq": VQAutoencoder}
SMALL = {"channels": 8, "channel_mult": [1, 2], "norm_groups": 4}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(family: str, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0, **settings
          ) -> Autoencoder:
    torch.manual_seed(seed)
    return FAMILIES[family](**{**SMALL, **settings}, data_shape=shape)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return Digits().load()  # (1, 8, 8) in [-1, 1]


# -- shapes and bad settings ------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("downsample", [2, 4])
@pytest.mark.parametrize("latent_channels", [1, 3, 8])
def test_latents_have_shape_c_by_h_over_f_by_w_over_f(family, downsample, latent_channels):
    shape = (3, 8, 12)  # not square: height and width are not confused
    ae = small(family, shape, downsample=downsample, latent_channels=latent_channels)
    latent = (latent_channels, 8 // downsample, 12 // downsample)
    assert ae.data_shape == shape and ae.latent_shape == latent
    x = torch.rand(5, *shape, generator=seeded(0)) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (5, *latent)
    assert ae.decode(z).shape == (5, *shape)
    assert ae.encode(x, seeded(1)).shape == (5, *latent)
    assert ae(x).shape == (5, *shape)
    assert ae.loss(x, seeded(2)).shape == ()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape,downsample,message", [
    ((1, 10, 10), 4, "divisible by 4"),
    ((1, 8, 6), 4, "divisible by 4"),
    ((1, 7, 8), 2, "divisible by 2"),
    ((64,), 2, "image data"),
])
def test_images_that_do_not_fit_are_a_clear_value_error(family, shape, downsample, message):
    with pytest.raises(ValueError, match=message):
        small(family, shape, downsample=downsample)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_settings_that_cannot_be_built_are_a_clear_value_error(family):
    with pytest.raises(ValueError, match="channel_mult needs 1 to 2 entries"):
        small(family, downsample=2, channel_mult=[1, 2, 2])
    with pytest.raises(ValueError, match="norm_groups"):
        small(family, channels=6, norm_groups=4)
    # a shorter channel_mult repeats its last entry: f = 4 has three levels
    ae = small(family, downsample=4, channel_mult=[1, 2])
    assert ae.encoder.conv_in.out_channels == 8
    assert ae.decoder.conv_in.out_channels == 16


# -- the KL autoencoder's loss -------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    g = seeded(3)
    mean = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 3
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()),
                             Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected.flatten(1).sum(1))
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0  # q = p


def test_gaussian_kl_matches_a_monte_carlo_estimate():
    """KL = E_q[log q(z) - log p(z)]: 200k draws, a tolerance of 6 standard errors."""
    mean = torch.tensor([[0.7, -1.5, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.5, 1.2]], dtype=torch.float64)
    q, p = Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(200_000, 3, generator=seeded(4),
                                                  dtype=torch.float64)
    terms = (q.log_prob(z) - p.log_prob(z)).sum(1)
    error = 6 * float(terms.std()) / math.sqrt(len(terms))
    assert float(terms.mean()) == pytest.approx(float(gaussian_kl(mean, logvar)), abs=error)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_kl_loss_is_reconstruction_of_a_posterior_draw_plus_beta_kl_per_element(loss):
    ae = small("kl", (1, 8, 8), downsample=2, latent_channels=2, loss=loss, kl_weight=0.01)
    x = torch.rand(4, 1, 8, 8, generator=seeded(5)) * 2 - 1
    got = ae.loss(x, seeded(6))
    with torch.no_grad():
        mean, logvar = ae.posterior(x)
        std = (0.5 * logvar).exp()
        z = mean + std * torch.randn(mean.shape, generator=seeded(6))
        error = ae.decode_unscaled(z) - x
        rho = error.abs() if loss == "l1" else error.square()
        kl = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).flatten(1).sum(1)
        expected = rho.mean() + 0.01 * kl.mean() / 64  # per image element: D = 1 * 8 * 8
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kl_encode_is_the_posterior_mean_or_a_draw_from_the_posterior():
    ae = small("kl", (1, 8, 8), downsample=2, latent_channels=4)
    x = torch.rand(64, 1, 8, 8, generator=seeded(7)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.posterior(x)
        torch.testing.assert_close(ae.encode_unscaled(x), mean)
        standardized = (ae.encode_unscaled(x, seeded(8)) - mean) / (0.5 * logvar).exp()
    n = standardized.numel()  # 4096 N(0, 1) draws: mean within 6/sqrt(n), variance within 15%
    assert abs(float(standardized.mean())) < 6 / math.sqrt(n)
    assert float(standardized.var()) == pytest.approx(1.0, abs=0.15)


def test_kl_log_variance_is_clamped():
    ae = small("kl", (1, 8, 8), downsample=2, latent_channels=1)
    with torch.no_grad():
        ae.encoder.conv_out.bias[1] = 1e4  # the log-variance channel
        ae.encoder.conv_out.bias[0] = 0
        _, logvar = ae.posterior(torch.zeros(2, 1, 8, 8))
    assert float(logvar.max()) == 20.0
    assert torch.isfinite(ae.loss(torch.zeros(2, 1, 8, 8), seeded(0)))


# -- the VQ autoencoder -----------------------------------------------------------------------
def test_vq_codes_are_the_nearest_codebook_vectors():
    ae = small("vq", (1, 8, 8), downsample=2, latent_channels=3, codebook_size=16)
    with torch.no_grad():
        ae.codebook.weight.copy_(torch.randn(16, 3, generator=seeded(9)))
    z = torch.randn(2, 3, 4, 4, generator=seeded(10))
    quantised, index = ae.quantise(z)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(vectors, ae.codebook.weight).argmin(dim=1)
    assert torch.equal(index.flatten(), nearest)
    torch.testing.assert_close(quantised.permute(0, 2, 3, 1).reshape(-1, 3),
                               ae.codebook.weight[nearest].detach())
    torch.testing.assert_close(ae.quantise(quantised)[0], quantised)  # codes are fixed points


def test_vq_straight_through_gradient_reaches_the_encoder_and_the_codebook_its_own():
    """With commitment 0 the encoder's gradient comes only through the straight-through
    estimator: it equals the reconstruction's gradient at z_q pushed back through the encoder.
    The codebook's is the codebook term's alone: d/de_k mean((sg z_e - e)^2) =
    2 / (N c) sum_{assigned to k} (e_k - z_e), N the latent pixels."""
    ae = small("vq", (1, 8, 8), downsample=2, latent_channels=3, codebook_size=8,
               commitment=0.0, loss="l2")
    x = torch.rand(4, 1, 8, 8, generator=seeded(11)) * 2 - 1
    ae.loss(x).backward()
    encoder_grads = [p.grad.clone() for p in ae.encoder.parameters()]
    codebook_grad = ae.codebook.weight.grad.clone()
    assert sum(float(g.abs().sum()) for g in encoder_grads) > 0

    ae.zero_grad()
    z_e = ae.encoder(x)
    z_q, index = ae.quantise(z_e)
    leaf = z_q.detach().requires_grad_(True)
    (ae.decoder(leaf) - x).square().mean().backward()
    z_e.backward(leaf.grad)
    for got, expected in zip(encoder_grads, (p.grad for p in ae.encoder.parameters()),
                             strict=True):
        torch.testing.assert_close(got, expected)

    vectors = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    k = index.flatten()
    expected = torch.zeros_like(codebook_grad).index_add_(
        0, k, ae.codebook.weight.detach()[k] - vectors) * 2 / vectors.numel()
    torch.testing.assert_close(codebook_grad, expected)
    assert float(codebook_grad.abs().sum()) > 0


def test_vq_commitment_pulls_the_encoder_towards_its_codes():
    ae = small("vq", (1, 8, 8), downsample=2, latent_channels=3, codebook_size=8,
               commitment=2.0)
    x = torch.rand(4, 1, 8, 8, generator=seeded(12)) * 2 - 1
    with torch.no_grad():
        z_e = ae.encoder(x)
        z_q, _ = ae.quantise(z_e)
        expected = ((ae.decoder(z_q) - x).abs().mean() + 3.0 * (z_e - z_q).square().mean())
    torch.testing.assert_close(ae.loss(x), expected)


# -- the latent scale ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calibrate_gives_unit_variance_latents_and_the_scale_cancels(family, digits):
    ae = small(family, (1, 8, 8), downsample=2, latent_channels=2, seed=1)
    images = digits.train[:300]
    scale = ae.calibrate(images, batch_size=len(images))
    assert float(ae.scale) == pytest.approx(scale)
    assert abs(math.log(scale)) > 0.1, "an untrained latent is not already unit-variance"
    with torch.no_grad():
        z = ae.encode(images).double()
        assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(ae.decode(ae.encode(images)), ae.reconstruct(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ae.decode(ae.encode(images)), ae(images),
                                   rtol=1e-5, atol=1e-5)


# -- training: the objective, the engine's loop, the metric -------------------------------------
def _mse(ae: Autoencoder, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ae.reconstruct(images) - images).square().mean())


@pytest.fixture(scope="module")
def trained(digits):
    """Each family trained for 300 Adam steps (batch 32) on 8x8 digits through the objective,
    with its held-out squared error before and after."""
    out = {}
    objective = Reconstruction()
    for family in sorted(FAMILIES):
        ae = small(family, (1, 8, 8), downsample=2, latent_channels=2, seed=2)
        before = _mse(ae, digits.heldout)
        model = types.SimpleNamespace(network=ae, process=None)  # a ScoreModel-like wrapper
        optimizer = torch.optim.Adam(ae.parameters(), lr=2e-3)
        g = seeded(13)
        for _ in range(300):
            batch = digits.train[torch.randint(len(digits.train), (32,), generator=g)]
            loss = objective.loss(model, batch, g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out[family] = (ae, before, _mse(ae, digits.heldout))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_short_training_cuts_the_held_out_reconstruction_error(family, trained):
    _, before, after = trained[family]
    assert after < before / 5, (before, after)


def test_reconstruction_objective_is_the_autoencoders_loss_and_refuses_other_networks():
    objective = get_registry().get("objective", "reconstruction").factory()
    assert isinstance(objective, Reconstruction) and objective.first_stage
    ae = small("kl", (1, 8, 8))
    assert objective.check(None, ae) is None
    reason = objective.check(None, MLP(data_shape=(2,)))
    assert isinstance(reason, str) and "autoencoder" in reason
    x = torch.rand(3, 1, 8, 8, generator=seeded(14)) * 2 - 1
    model = types.SimpleNamespace(network=ae, process=None)
    torch.testing.assert_close(objective.loss(model, x, seeded(15)), ae.loss(x, seeded(15)))
    with pytest.raises(TypeError, match="autoencoder"):
        objective.loss(types.SimpleNamespace(network=MLP(data_shape=(2,))), torch.zeros(3, 2))


def test_reconstruction_metric_is_psnr_and_ssim_of_the_reconstructions(trained, digits):
    metric = ReconstructionQuality(resamples=200)
    ae, _, _ = trained["kl"]
    out = metric.evaluate(None, digits, seeded(16), types.SimpleNamespace(network=ae))
    assert set(out) == {f"recon_{m}{s}" for m in ("psnr", "ssim")
                        for s in ("", "_std", "_low", "_high", "_n")}
    with torch.no_grad():
        mse = (ae.reconstruct(digits.heldout).double() - digits.heldout.double()
               ).square().flatten(1).mean(1)
    psnr = 10 * torch.log10(2.0**2 / mse)  # data in [-1, 1]: peak-to-peak 2
    assert out["recon_psnr"] == pytest.approx(float(psnr.mean()), rel=1e-5)
    assert out["recon_psnr_low"] < out["recon_psnr"] < out["recon_psnr_high"]
    assert out["recon_psnr_n"] == len(digits.heldout)
    assert 0 < out["recon_ssim"] <= 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reconstruction_metric_is_higher_for_a_trained_autoencoder(family, trained, digits):
    metric = ReconstructionQuality(resamples=0)
    ae, _, _ = trained[family]
    fresh = small(family, (1, 8, 8), downsample=2, latent_channels=2, seed=2)
    good = metric.evaluate(None, digits, seeded(0), types.SimpleNamespace(network=ae))
    bad = metric.evaluate(None, digits, seeded(0), types.SimpleNamespace(network=fresh))
    assert good["recon_psnr"] > bad["recon_psnr"] + 5
    assert good["recon_ssim"] > bad["recon_ssim"]


def test_reconstruction_metric_refuses_a_model_without_an_autoencoder(digits):
    metric = ReconstructionQuality(resamples=0)
    with pytest.raises(ValueError, match="needs an autoencoder"):
        metric.evaluate(None, digits, seeded(0), types.SimpleNamespace(network=MLP(
            data_shape=(64,))))
    with pytest.raises(ValueError, match="needs an autoencoder"):
        metric.evaluate(None, digits, seeded(0), None)
    wrong = DataSplits(train=torch.zeros(4, 1, 16, 16), heldout=torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        metric.evaluate(None, wrong, seeded(0), types.SimpleNamespace(network=small("kl")))


# -- the registry: schema, bounds, building from a spec mapping ------------------------------
@pytest.mark.parametrize("name", ["kl", "vq"])
def test_autoencoders_are_registered_built_from_mappings_and_bounded(name):
    registry = get_registry()
    component = registry.get("autoencoder", name)
    assert component.source == BUILTIN_SOURCE and component.context == ("data_shape",)
    found = []
    for pname, info in component.params.model_fields.items():
        found += _unbounded(info.annotation, [info, *info.metadata], f"{name}.{pname}")
    assert not found, f"parameters without a lower and an upper bound: {found}"
    ae = registry.build("autoencoder", {"kind": name, "downsample": 4, "latent_channels": 3},
                        data_shape=(1, 16, 16))
    assert isinstance(ae, FAMILIES[name]) and ae.latent_shape == (3, 4, 4)
    for bad in ({"downsample": 3}, {"latent_channels": 0}, {"latent_channels": 65},
                {"channel_mult": [1, 2, 2, 2]}, {"loss": "l3"}, {"blocks": 0}):
        with pytest.raises(ValueError):
            component.params.model_validate(bad)


def test_reconstruction_metric_and_objective_are_registered():
    registry = get_registry()
    assert registry.get("metric", "reconstruction").factory is ReconstructionQuality
    assert not ReconstructionQuality.needs_samples
    assert registry.get("objective", "reconstruction").factory is Reconstruction



def test_the_shared_engine_trains_a_first_stage_and_calibrates_its_scale(digits):
    """Diffusion(process=None, autoencoder, reconstruction).fit: the engine's loop (EMA
    included) trains it, and fit ends by setting the latent scale over the training set."""
    from diffusers_kit.diffusion import Diffusion

    ae = small("kl", (1, 8, 8), downsample=2, latent_channels=2, seed=3)
    before = _mse(ae, digits.heldout)
    diffusion = Diffusion(None, ae, Reconstruction(), device="cpu")
    diffusion.fit(digits, steps=60, batch_size=32, ema_decay=0.9, log_every=20)
    with diffusion.sampling_weights(), torch.no_grad():  # the EMA weights, calibrated
        assert _mse(ae, digits.heldout) < before / 2
        z = ae.encode(digits.train).double()
        assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
        out = ReconstructionQuality(resamples=0).evaluate(None, digits, seeded(0),
                                                          diffusion.model)
    assert math.isfinite(out["recon_psnr"])

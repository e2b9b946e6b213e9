"""Latent diffusion as composition (diffusers_kit.latent): the scale factor applied on both
sides, data encoded once, samples decoded, model-only metrics labelled latent, and the
measurement terms seen through the decoder.

The fixture is an exactly invertible linear first stage, ``pixel_unshuffle`` (f = 2: four
latent channels per pixel channel) times a fixed gain, so every identity below has an exact
answer computed without the autoencoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.data.base import DataSplits
from diffusers_kit.diffusion import Diffusion
from diffusers_kit.forward_models.inpaint import Inpaint
from diffusers_kit.guidance.measurement import DPS, PiGDM
from diffusers_kit.latent import DecodedOperator, LatentCache, decode, encode
from diffusers_kit.metrics.base import Metric, metric_figures
from diffusers_kit.networks.unet import UNet
from diffusers_kit.objectives.base import Objective
from diffusers_kit.processes.ddpm import DDPM
from diffusers_kit.solvers.ddim import DDIM

GAIN = 3.0


class Unshuffle(Autoencoder):
    """``E(x) = GAIN * pixel_unshuffle(x, 2)``, ``D`` its exact inverse; counts encodings."""

    def __init__(self, *, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        c, h, w = data_shape
        self.data_shape = tuple(data_shape)
        self.latent_shape = (4 * c, h // 2, w // 2)
        self.gain = torch.nn.Parameter(torch.tensor(GAIN))  # one parameter: a Network
        self.encoded = 0

    def encode_unscaled(self, x, generator=None):
        self.encoded += len(x)
        return self.gain * torch.nn.functional.pixel_unshuffle(x, 2)

    def decode_unscaled(self, z):
        return torch.nn.functional.pixel_shuffle(z / self.gain, 2)

    def loss(self, x, generator=None):
        return (self.reconstruct(x) - x).pow(2).mean()


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g) * 0.5


def test_scale_factor_gives_unit_variance_and_cancels_on_the_way_back():
    x = images(256)
    ae = Unshuffle(data_shape=(1, 8, 8))
    scale = ae.calibrate(x)
    z = encode(ae, x)
    # independent route: the latent is a permutation of GAIN * x, so std(z) = GAIN * std(x)
    assert scale == pytest.approx(1 / (GAIN * float(x.double().std(unbiased=False))), rel=1e-6)
    assert float(z.double().var(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(decode(ae, z), x, atol=1e-6)
    assert torch.allclose(ae.decode(ae.encode(x)), ae.reconstruct(x), atol=1e-6)


def test_scale_is_saved_with_the_weights(tmp_path):
    ae = Unshuffle(data_shape=(1, 8, 8))
    ae.calibrate(images())
    other = Unshuffle(data_shape=(1, 8, 8))
    other.load_state_dict(ae.state_dict())
    assert float(other.scale) == float(ae.scale) != 1.0


def test_latent_cache_encodes_each_image_set_once():
    x = images()
    ae = Unshuffle(data_shape=(1, 8, 8))
    cache = LatentCache(ae)
    first = cache.latents(x)
    assert cache.latents(x) is first and cache.latents(x.clone()) is first
    assert ae.encoded == len(x)
    splits = cache.splits(DataSplits(train=x, heldout=x[:8]))
    assert splits.train is first and splits.heldout.shape == (8, 4, 4, 4)


class Moments(Objective):
    """A cheap stand-in objective: the network output's mean square (trains something)."""

    def loss(self, model, x0, generator=None, labels=None):
        self.seen = tuple(x0.shape[1:])
        t = torch.rand(x0.shape[0], generator=generator)
        return model(x0, t).pow(2).mean()


def latent_model(objective: Objective | None = None) -> tuple[Diffusion, Unshuffle]:
    ae = Unshuffle(data_shape=(1, 8, 8))
    ae.calibrate(images())
    torch.manual_seed(0)
    net = UNet(channels=8, channel_mult=[1], res_blocks=1, attention_resolutions=[],
               norm_groups=4, data_shape=ae.latent_shape)
    return Diffusion(DDPM(num_steps=50), net, objective, device="cpu", autoencoder=ae), ae


def test_fit_trains_on_latents_encoded_once_and_sample_returns_images():
    objective = Moments()
    model, ae = latent_model(objective)
    x = images(64)
    model.fit(x, steps=3, batch_size=16, ema_decay=0.0)
    assert objective.seen == (4, 4, 4)
    encoded = ae.encoded
    model.fit(x, steps=2, batch_size=16, ema_decay=0.0)  # the same images: no new encoding
    assert ae.encoded == encoded
    result = model.sample(6, DDIM(steps=5), seed=1)
    assert result.samples.shape == (6, 1, 8, 8)
    assert result.latents is not None and result.latents.shape == (6, 4, 4, 4)
    assert torch.allclose(result.samples, decode(ae, result.latents), atol=1e-6)
    # the same latents, decoded independently: pixel_shuffle of z / (scale * GAIN)
    direct = torch.nn.functional.pixel_shuffle(result.latents / (ae.scale * GAIN), 2)
    assert torch.allclose(result.samples, direct, atol=1e-5)


def test_a_network_of_the_wrong_shape_is_refused():
    ae = Unshuffle(data_shape=(1, 8, 8))
    net = UNet(channels=8, channel_mult=[1], res_blocks=1, attention_resolutions=[],
               norm_groups=4, data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="latents have shape"):
        Diffusion(DDPM(num_steps=50), net, autoencoder=ae)


class HeldoutMean(Metric):
    """A metric of the model alone: reports the held-out data's mean square."""

    needs_samples = False

    def evaluate(self, samples, data, generator, model=None):
        return {"heldout_power": float(data.heldout.pow(2).mean())}


def test_model_only_metrics_see_latents_and_are_labelled_latent():
    x = images(64)
    model, _ = latent_model()
    data = DataSplits(train=x[:48], heldout=x[48:])
    seen = model.model_data(data)
    figures = metric_figures(HeldoutMean(), None, data, torch.Generator(), model.model,
                             model_data=seen)
    assert list(figures) == ["latent_heldout_power"]
    assert figures["latent_heldout_power"] == pytest.approx(float(seen.heldout.pow(2).mean()))
    pixel = metric_figures(HeldoutMean(), None, data, torch.Generator(), model.model,
                           model_data=data)
    assert list(pixel) == ["heldout_power"]


def test_dps_measures_decoded_estimates_and_svd_methods_are_refused():
    model, ae = latent_model()
    operator = Inpaint(mask="center", data_shape=(1, 8, 8))
    dps = DPS(operator)
    assert dps.check(model.model) is None  # built for the images, not the latents
    seen = dps.forward_operator(model.model)
    assert isinstance(seen, DecodedOperator) and seen.data_shape == ae.latent_shape
    # declared nonlinear (no adjoint, SVD or pinv), measured with the pixel operator's noise
    assert not (seen.linear or seen.has_adjoint or seen.has_svd or seen.has_pinv)
    assert seen.noise is operator.noise
    z = torch.randn(3, *ae.latent_shape)
    assert torch.allclose(seen.A(z), operator.A(decode(ae, z)), atol=1e-6)
    assert dps.forward_operator(model.model) is seen  # built once
    reason = PiGDM(operator).check(model.model)
    assert reason is not None and "use dps" in reason
    poisson = Inpaint(mask="center", data_shape=(1, 8, 8), noise="poisson", photons=50.0)
    assert DPS(poisson).forward_operator(model.model).noise is poisson.noise
    # the gradient reaches the latent through the decoder: d/dz ||A(D(z))||^2 = 2 J^T A^T A D(z)
    z.requires_grad_(True)
    seen.A(z).pow(2).sum().backward()
    expected = torch.nn.functional.pixel_unshuffle(
        2 * operator.A_adjoint(operator.A(decode(ae, z.detach()))), 2) / (ae.scale * GAIN)
    assert torch.allclose(z.grad, expected, atol=1e-5)


def test_restoring_with_a_latent_model_returns_images():
    from diffusers_kit.restore import restore

    model, _ = latent_model()
    method = DPS(Inpaint(mask="center", data_shape=(1, 8, 8)), zeta=0.5)
    result = restore(model, method, images(4), DDIM(steps=4), seed=0)
    assert result.samples.shape == (4, 1, 8, 8)
    assert torch.isfinite(result.samples).all()


# -- the shipped specs, end to end through the command line (tiny settings) -----------------
SPECS = Path(__file__).resolve().parents[1] / "specs"


def test_autoencoder_then_latent_diffusion_through_the_cli(tmp_path, capsys, monkeypatch):
    import json

    from tests.helpers import run_cli

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    code, _, err = run_cli(["run", str(SPECS / "autoencoder_digits.yaml"), "train.steps=3",
                            f"output.root={root}", "device=cpu"], capsys)
    assert code == 0, err
    first = root / "autoencoder_digits" / "latest"
    assert (first / "reconstructions.png").is_file()
    record = json.loads((first / "metrics.json").read_text())
    assert record["latent_scale"] > 0 and "recon_psnr" in record
    code, _, err = run_cli(["run", str(SPECS / "latent_digits.yaml"), "train.steps=2",
                            "sample.n=10", "sample.solver.steps=3", f"latent={first}",
                            "evaluate.metrics=[{kind: swd}]", f"output.root={root}",
                            "device=cpu"], capsys)
    assert code == 0, err
    run = (root / "latent_digits" / "latest").resolve()
    arrays = np.load(run / "samples.npz")
    assert arrays["samples"].shape == (10, 1, 16, 16)  # decoded images, not 4x4x4 latents
    assert (run / "samples.png").is_file()
    resolved = yaml.safe_load((run / "spec.yaml").read_text())
    assert Path(resolved["latent"]["run"]).resolve() == first.resolve()  # with its hash
    # sampling the finished run again goes through the same decoder
    code, _, err = run_cli(["sample", str(run), "--n", "4", "--solver",
                            "{kind: ddim, steps: 2}"], capsys)
    assert code == 0, err


def test_spec_mistakes_name_the_field(tmp_path, capsys, monkeypatch):
    from tests.helpers import run_cli

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "ae.yaml"
    spec.write_text("name: ae\ndata: {kind: digits, size: 16}\nautoencoder: {kind: kl}\n"
                    "process: {kind: ddpm}\n", encoding="utf-8")
    code, out, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "process" in out + err and "autoencoder" in out + err
    spec.write_text("name: ae\ndata: {kind: digits, size: 12}\nautoencoder: {kind: kl}\n",
                    encoding="utf-8")
    code, out, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "size" in out + err
    spec.write_text("name: ae\ndata: {kind: digits}\nautoencoder: {kind: kl, downsample: 4}\n"
                    "train: {steps: 1}\n", encoding="utf-8")
    code, out, err = run_cli(["run", str(spec), f"output.root={tmp_path / 'runs'}"], capsys)
    assert code == 0, err  # 8x8 digits, f = 4: 2x2 latents
    trained = tmp_path / "runs" / "ae" / "latest"
    latent = tmp_path / "latent.yaml"
    latent.write_text(
        f"name: lat\ndata: {{kind: digits, size: 16}}\nlatent: {trained}\n"
        "process: {kind: ddpm}\nnetwork: {kind: mlp}\nobjective: {kind: ddpm_simple}\n"
        "train: {steps: 1}\n", encoding="utf-8")
    code, out, err = run_cli(["run", str(latent), f"output.root={tmp_path / 'runs'}"], capsys)
    assert code == 2 and "latent" in out + err and "(1, 8, 8)" in out + err


def test_dkit_restore_defaults_to_dps_for_a_latent_run():
    from diffusers_kit.cli.restore import default_method

    # the run's resolved spec, as the command reads it from the run folder once
    assert default_method({"name": "a", "latent": "runs/ae/latest"}) == "dps"
    assert default_method({"name": "a", "latent": None}) == "pigdm"

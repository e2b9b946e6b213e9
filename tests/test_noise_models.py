"""Noise models (diffusers_kit/forward_models/noise.py): sampling moments against closed forms,
log-likelihoods against scipy.stats, and their use by ``simulate``, the testing kit and the
methods (replacement and ΠGDM refuse non-Gaussian noise; DPS ascends the noise's widened
log-likelihood)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusers_kit.forward_models import (
    GaussianNoise,
    Inpaint,
    PoissonGaussianNoise,
    PoissonNoise,
)
from diffusers_kit.guidance import DPS, PiGDM, Replacement
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import VP
from diffusers_kit.registry import get_registry
from diffusers_kit.testing import Z, check_forward_model
from tests.gaussian_mixture import ExactScoreNetwork, GaussianMixture

# clean measurements on [-1, 1] (and below it, where a Poisson rate clamps at 0)
A_VALUES = torch.tensor([[-1.3, -1.0, -0.6, 0.0, 0.35, 1.0]], dtype=torch.float64)


def closed_form(model, a):  # type: ignore[no-untyped-def]
    """Mean and variance of y | a written out for data in [-1, 1] (scale 2)."""
    if isinstance(model, GaussianNoise):
        return a, torch.full_like(a, model.sigma_y**2)
    u = ((a + 1) / 2).clamp_min(0)
    mean, var = -1 + 2 * u, 4 * u / model.photons
    if isinstance(model, PoissonGaussianNoise):
        var = var + model.sigma_y**2
    return mean, var


MODELS = {
    "gaussian": lambda: GaussianNoise(0.2),
    "poisson": lambda: PoissonNoise(photons=20.0),
    "poisson_gaussian": lambda: PoissonGaussianNoise(photons=20.0, sigma_y=0.1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_sampling_moments_are_the_closed_forms(name):
    model = MODELS[name]()
    n = 200_000
    a = A_VALUES.expand(n, -1)
    y = model.sample(a, torch.Generator().manual_seed(0))
    mean, var = closed_form(model, A_VALUES[0])
    assert torch.allclose(model.mean(A_VALUES)[0], mean) and \
        torch.allclose(model.variance(A_VALUES)[0], var)
    for j in range(A_VALUES.shape[1]):
        column = y[:, j]
        if var[j] == 0:  # a Poisson rate of 0: y is the bottom of the range exactly
            assert (column == mean[j]).all()
            continue
        assert abs(float(column.mean() - mean[j])) <= Z * math.sqrt(var[j] / n)
        fourth = float(((column - mean[j]) ** 4).mean())
        assert abs(float(column.var() - var[j])) <= Z * math.sqrt(
            max(fourth - float(var[j]) ** 2, 0) / n) + 1e-12
    if name == "poisson":  # y sits on the count lattice
        k = model.counts(y)
        assert torch.allclose(k, k.round(), atol=1e-9)


def test_log_likelihoods_are_scipys():
    a = torch.tensor([[-0.6, 0.0, 0.35, 0.9]], dtype=torch.float64)
    y = torch.tensor([[-0.5, 0.1, 0.2, 1.1]], dtype=torch.float64)
    gaussian = GaussianNoise(0.2)
    expected = stats.norm.logpdf(y.numpy(), a.numpy(), 0.2).sum()
    assert math.isclose(float(gaussian.log_likelihood(y, a)), expected, rel_tol=1e-12)

    poisson = PoissonNoise(photons=20.0)
    counts = poisson.sample(a.expand(3, -1), torch.Generator().manual_seed(1))
    k = ((counts + 1) * 20 / 2).round().numpy()
    rate = ((a + 1) / 2 * 20).numpy()
    expected = stats.poisson.logpmf(k, rate).sum(1)
    assert np.allclose(poisson.log_likelihood(counts, a.expand(3, -1)).numpy(), expected,
                       rtol=1e-12)

    mixed = PoissonGaussianNoise(photons=20.0, sigma_y=0.1)
    ks = np.arange(0, 400)
    expected = 0.0
    for aj, yj in zip(a[0].tolist(), y[0].tolist(), strict=True):
        terms = stats.poisson.pmf(ks, (aj + 1) / 2 * 20) * stats.norm.pdf(
            yj, -1 + 2 * ks / 20, 0.1)
        expected += math.log(terms.sum())
    assert math.isclose(float(mixed.log_likelihood(y, a)), expected, rel_tol=1e-10)


def test_the_widened_likelihood_is_the_stated_gaussian():
    """Gaussian noise: ``N(y; a, sigma_y^2 + extra)`` exactly (up to a constant in ``a``);
    Poisson: the variance at the measurement, floored at one count's."""
    a = torch.tensor([[0.1, -0.4]], dtype=torch.float64)
    y = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    extra = torch.tensor([0.05], dtype=torch.float64)
    got = GaussianNoise(0.2).widened_log_likelihood(y, a, extra)
    expected = stats.norm.logpdf(y.numpy(), a.numpy(), math.sqrt(0.04 + 0.05)).sum() + \
        math.log(2 * math.pi)
    assert math.isclose(float(got), expected, rel_tol=1e-12)
    poisson = PoissonNoise(photons=20.0)
    variance = torch.tensor([4 * 0.65 / 20, (2 / 20) ** 2], dtype=torch.float64)  # y = -1: floor
    total = variance + 0.05
    expected = float(-0.5 * ((y - a)[0] ** 2 / total + total.log()).sum())
    assert math.isclose(float(poisson.widened_log_likelihood(y, a, extra)), expected,
                        rel_tol=1e-12)


@pytest.mark.parametrize("name", ["inpaint", "blur", "super_resolution", "colorize", "denoise",
                                  "matrix"])
def test_every_builtin_operator_simulates_poisson_noise(name):
    """Built through the registry as a spec would: the kit checks ``simulate`` against the
    noise model (Poisson and Poisson-Gaussian)."""
    for noise in ({"noise": "poisson", "photons": 30.0},
                  {"noise": "poisson_gaussian", "photons": 30.0, "sigma_y": 0.05}):
        op = get_registry().build("forward_model", {"kind": name, **noise},
                                  data_shape=(3, 8, 8))
        assert not op.noise.gaussian and op.noise.photons == 30.0
        check_forward_model(op)


def test_noise_settings_are_checked():
    with pytest.raises(ValueError, match="photons"):
        Inpaint(noise="poisson", data_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="sigma_y: poisson noise has no Gaussian part"):
        Inpaint(noise="poisson", photons=10.0, sigma_y=0.1, data_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="noise"):  # pydantic: not one of the three
        get_registry().build("forward_model", {"kind": "inpaint", "noise": "laplace"},
                             data_shape=(1, 4, 4))


def test_the_kit_catches_noise_that_is_not_the_noise_model():
    class Loud(Inpaint):
        def simulate(self, x, generator=None):  # type: ignore[no-untyped-def]
            return self.A(x) + 2 * self.sigma_y * torch.randn(
                self.A(x).shape, generator=generator, dtype=x.dtype)

    with pytest.raises(AssertionError, match="variance"):
        check_forward_model(Loud(sigma_y=0.1, data_shape=(1, 8, 8)))


def test_methods_read_the_noise_model():
    op = Inpaint(noise="poisson", photons=50.0, mask="half", data_shape=(2,))
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(GaussianMixture([1.0], [[0.0, 0.0]],
                                                                  [[0.5, 0.5]]), process))
    for method in (Replacement, PiGDM):
        reason = method(op).check(model)
        assert reason is not None and reason.startswith("Gaussian measurement noise") \
            and "use dps" in reason
    dps = DPS(op, data_std=0.5)
    assert dps.check(model) is None
    x0 = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    y = torch.tensor([[0.4]], dtype=torch.float64)
    t = torch.tensor([0.4], dtype=torch.float64)
    got = dps.objective(model, t, y, x0)
    level2 = float((process.marginal(t)[1] / process.marginal(t)[0]) ** 2)
    total = 4 * 0.7 / 50 + 0.25 * level2 / (0.25 + level2)
    assert math.isclose(float(got), -0.5 * ((0.4 - 0.2) ** 2 / total + math.log(total)),
                        rel_tol=1e-10)


SPEC = """\
name: poisson_restore
seed: 0
device: cpu
data: {kind: digits}
process: {kind: ddpm, num_steps: 100}
network: {kind: unet, channels: 8, channel_mult: [1], res_blocks: 1, attention_resolutions: []}
objective: {kind: ddpm_simple}
train: {steps: 2, batch_size: 16, log_every: 1}
restore:
  method:
    kind: METHOD
    operator: {kind: blur, noise: poisson, photons: 50}
  solver: {kind: ddim, steps: 3}
  n: 2
evaluate: {metrics: []}
output: {root: {root}}
"""


def on_the_photon_lattice(npz_path, photons: float) -> bool:
    """Whether the saved measurement is ``-1 + 2 k / photons`` for counts ``k >= 0``."""
    with np.load(npz_path) as npz:
        counts = (npz["measurement"].astype(np.float64) + 1) * photons / 2
    return bool(np.allclose(counts, counts.round(), atol=1e-4) and (counts >= 0).all())


def test_a_spec_restores_a_poisson_measurement_with_dps(tmp_path, capsys):
    """The Poisson case through a spec's restore section and through ``dkit restore`` with the
    method of the shipped ``specs/poisson_photos.yaml``: DPS runs and the measurement it saved
    lies on the photon-count lattice; ΠGDM is refused with the reason (exit 2)."""
    import json
    from pathlib import Path

    import yaml

    from tests.helpers import run_cli, write_spec

    code, _, err = run_cli(["run", str(write_spec(tmp_path, SPEC.replace("METHOD", "dps"))),
                            "--quiet"], capsys)
    assert code == 0, err
    (run,) = [p for p in (tmp_path / "runs" / "poisson_restore").iterdir()
              if p.name != "latest"]
    assert on_the_photon_lattice(run / "restore.npz", 50)
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "specs" /
                              "poisson_photos.yaml").read_text(encoding="utf-8"))
    method = shipped["restore"]["method"]
    assert method["kind"] == "dps" and method["operator"]["noise"] == "poisson"
    code, _, err = run_cli(["restore", str(run), "--method", json.dumps(method), "--n", "2",
                            "--solver", "{kind: ddim, steps: 3}", "--quiet"], capsys)
    assert code == 0, err
    (folder,) = (run / "restoration").iterdir()
    assert folder.name.startswith("dps-denoise-")
    assert on_the_photon_lattice(folder / "restore.npz", method["operator"]["photons"])
    code, out, err = run_cli(["run", str(write_spec(tmp_path, SPEC.replace("METHOD", "pigdm"),
                                                    "refused.yaml"))], capsys)
    assert code == 2 and "Gaussian measurement noise" in out + err


def test_dps_on_poisson_noise_against_the_exact_posterior():
    """Denoising under Poisson noise on a Gaussian prior ``N(mu, 0.8^2 I)``: the likelihood
    factorises per coordinate, so the exact posterior is a product of 1-D densities on a
    grid. DPS (DDIM, 100 steps), per coordinate, misses the posterior mean by -0.22 / -0.27
    posterior std with spread 0.92 / 0.95 of it at 20 photons, and by -0.08 / -0.09 with
    spread 0.89 / 0.88 at 200 photons (docs/inverse.md)."""
    from diffusers_kit.forward_models import Denoise
    from diffusers_kit.solvers import DDIM

    prior = GaussianMixture([1.0], [[0.5, -0.3]], [[0.8, 0.8]])
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(prior, process))
    truth = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    grid = torch.linspace(-1, 3, 40001, dtype=torch.float64)
    measured = {20.0: [(-0.217, 0.918), (-0.272, 0.954)],
                200.0: [(-0.084, 0.886), (-0.094, 0.882)]}
    for photons, figures in measured.items():
        op = Denoise(noise="poisson", photons=photons, data_shape=(2,))
        y = op.simulate(truth, torch.Generator().manual_seed(0))
        samples = DDIM(steps=100).sample(
            model.guided([DPS(op, data_std=0.8)], None, y.expand(2000, 2)), (2000, 2),
            generator=torch.Generator().manual_seed(1)).samples.double()
        for i, (bias, spread) in enumerate(figures):
            log = -0.5 * ((grid - prior.means[0, i]) / 0.8) ** 2 + op.noise.log_likelihood(
                y[:, i:i + 1].expand(len(grid), 1), grid[:, None])
            w = torch.softmax(log, 0)
            mean = (w * grid).sum()
            std = (w * (grid - mean) ** 2).sum().sqrt()
            assert abs(float((samples[:, i].mean() - mean) / std) - bias) < 0.07
            assert abs(float(samples[:, i].std() / std) - spread) < 0.05

"""A nonlinear operator from a third party (tests/third_party/dkit_tanh_sensor.py, installed
through an entry point like any plugin): it passes the plugin authors' kit, dkit's own
registry-wide operator tests stay green with it installed (the linear identities skip it by
its declared ``linear = False``), the SVD methods refuse it naming what is missing, and DPS
restores through it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_kit import registry as registry_module
from diffusers_kit.guidance import DPS, PiGDM, Replacement
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import VP
from diffusers_kit.solvers import DDIM
from diffusers_kit.testing import check_forward_model
from tests.gaussian_mixture import ExactScoreNetwork, GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "third_party"


def install(site: Path) -> None:
    """An installed distribution ``dkit-tanh`` whose entry point names the plugin module."""
    info = site / "dkit_tanh-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dkit-tanh\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[diffusers_kit]\ntanh = dkit_tanh_sensor\n")


@pytest.fixture
def tanh_plugin(tmp_path, monkeypatch):
    install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PLUGIN))
    registry_module.reset_registry()
    yield registry_module.get_registry()
    registry_module.reset_registry()
    sys.modules.pop("dkit_tanh_sensor", None)


def test_the_plugin_passes_the_kit_and_declares_what_it_lacks(tanh_plugin):
    component = tanh_plugin.get("forward_model", "tanh_sensor")
    assert component.source == "dkit-tanh"
    for shape in ((2,), (1, 8, 8), (3, 8, 8)):
        op = tanh_plugin.build("forward_model", {"kind": "tanh_sensor"}, data_shape=shape)
        assert not op.linear and not op.has_svd and not op.has_adjoint and op.has_pinv
        check_forward_model(op)
    with pytest.raises(NotImplementedError, match="needs an SVD; TanhSensor is nonlinear"):
        op.Vt(torch.zeros(1, *op.data_shape))
    with pytest.raises(NotImplementedError, match="no adjoint: TanhSensor is nonlinear"):
        op.A_adjoint(torch.zeros(1, *op.measurement_shape))
    model = ScoreModel(VP(), ExactScoreNetwork(GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 1.0]]),
                                               VP()))
    op = tanh_plugin.build("forward_model", {"kind": "tanh_sensor"}, data_shape=(2,))
    for method in (Replacement, PiGDM):
        assert method(op).check(model) == \
            "an operator with an SVD (TanhSensor is nonlinear: use dps)"
    assert DPS(op).check(model) is None


def test_the_kit_catches_a_wrong_derivative_and_a_wrong_pinv(tanh_plugin):
    module = sys.modules["dkit_tanh_sensor"]

    class Detached(module.TanhSensor):  # its backward is not its derivative
        def A(self, x):  # type: ignore[no-untyped-def]
            return torch.tanh(self.gain * x.detach()) + 0 * x

    class Halved(module.TanhSensor):
        def pinv(self, y):  # type: ignore[no-untyped-def]
            return super().pinv(y) / 2

    with pytest.raises(AssertionError, match="finite differences"):
        check_forward_model(Detached(data_shape=(4,)))
    with pytest.raises(AssertionError, match=r"A\(pinv\(A x\)\)"):
        check_forward_model(Halved(data_shape=(4,)))


def test_dkit_registry_wide_operator_tests_stay_green_with_the_plugin_installed(tmp_path):
    """The operator cases of dkit's own suite, collected with the plugin installed: its cases
    pass or skip by its declared capability, none fails."""
    install(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site"), str(PLUGIN), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "tests/test_forward_models.py", "tests/test_testing_kit.py",
         "-k", "tanh_sensor or negative_sigma_y or every_registered_operator"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    lines = out.splitlines()
    passed = [line for line in lines if line.startswith("PASSED") and "tanh_sensor" in line]
    skips = [line for line in lines if line.startswith("SKIPPED")]
    tanh_skips = [line for line in skips if "TanhSensor" in line]
    # float32 and noise on each of the 3 shapes, and the kit
    assert len(passed) >= 7 and not re.search(r"\d+ failed", out), out[-3000:]
    assert tanh_skips and all("declares linear = False" in line for line in tanh_skips), skips


def test_dps_restores_through_the_nonlinear_sensor():
    """On a Gaussian prior ``N(mu, 0.8^2 I)`` the likelihood of ``y = tanh(3 x) + 0.05 n``
    factorises per coordinate, so the exact posterior is a product of 1-D densities computed
    on a grid. DPS (DDIM, 100 steps) puts 66 % / 78 % of its samples (per coordinate) in the
    posterior's bulk (within 5 posterior std of its mean), with mean error 0.17 / 0.09 std
    and spread 1.22 / 0.35 of the posterior's there; the rest are stuck where tanh saturates
    and the gradient through ``A`` vanishes (docs/inverse.md)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from dkit_tanh_sensor import TanhSensor
    finally:
        sys.path.remove(str(PLUGIN))
    op = TanhSensor(data_shape=(2,))
    prior = GaussianMixture([1.0], [[0.5, -0.3]], [[0.8, 0.8]])
    truth = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    y = op.simulate(truth, torch.Generator().manual_seed(0))
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(prior, process))
    n = 2000
    samples = DDIM(steps=100).sample(model.guided([DPS(op, data_std=0.8)], None,
                                                  y.expand(n, 2)),
                                     (n, 2), generator=torch.Generator().manual_seed(1)
                                     ).samples.double()
    measured = [(0.656, 0.17, 1.22), (0.781, 0.09, 0.35)]
    for i, (share, bias, spread) in enumerate(measured):
        log = (-0.5 * ((grid - prior.means[0, i]) / 0.8) ** 2
               - 0.5 * ((y[0, i] - torch.tanh(3 * grid)) / op.sigma_y) ** 2)
        w = torch.softmax(log, 0)
        mean = (w * grid).sum()
        std = (w * (grid - mean) ** 2).sum().sqrt()
        z = (samples[:, i] - mean) / std
        bulk = z.abs() < 5
        assert abs(float(bulk.double().mean()) - share) < 0.05, float(bulk.double().mean())
        assert abs(float(z[bulk].mean()) - bias) < 0.1, float(z[bulk].mean())
        assert abs(float(z[bulk].std()) - spread) < 0.1, float(z[bulk].std())
        stuck = samples[~bulk, i]
        assert (3 / torch.cosh(3 * stuck) ** 2 < 3 / torch.cosh(3 * mean) ** 2).all()


def test_a_spec_restores_through_the_plugin_sensor(tanh_plugin, tmp_path, capsys):
    """The nonlinear case through a spec's restore section and through ``dkit restore`` (the
    plugin installed): DPS runs, ΠGDM is refused with exit 2 naming what is missing."""
    from tests.helpers import run_cli, write_spec
    from tests.test_noise_models import SPEC

    text = SPEC.replace("{kind: blur, noise: poisson, photons: 50}", "{kind: tanh_sensor}")
    text = text.replace("name: poisson_restore", "name: tanh_restore")
    code, _, err = run_cli(["run", str(write_spec(tmp_path, text.replace("METHOD", "dps"))),
                            "--quiet"], capsys)
    assert code == 0, err
    (run,) = [p for p in (tmp_path / "runs" / "tanh_restore").iterdir() if p.name != "latest"]
    assert "tanh_sensor" in (run / "spec.yaml").read_text()
    code, _, err = run_cli(["restore", str(run), "--operator", "{kind: tanh_sensor}",
                            "--method", "dps", "--n", "2", "--solver", "{kind: ddim, steps: 3}",
                            "--quiet"], capsys)  # the same through dkit restore
    assert code == 0, err
    (folder,) = (run / "restoration").iterdir()
    assert folder.name.startswith("dps-tanh_sensor-")
    assert (folder / "restore.npz").is_file()
    code, out, err = run_cli(["run", str(write_spec(tmp_path, text.replace("METHOD", "pigdm"),
                                                    "refused.yaml"))], capsys)
    assert code == 2 and "an operator with an SVD (TanhSensor is nonlinear: use dps)" in out + err

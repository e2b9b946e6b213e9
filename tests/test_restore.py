"""Restoration through the spec (`restore:` section), the CLI (`dkit restore`) and Python
(:func:`diffusers_kit.restore.restore`), with clean errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import finished_run, run_cli, write_spec

SPEC = """\
name: tiny_restore
seed: 0
device: cpu
data: {kind: digits}
process: {kind: ddpm, num_steps: 100}
network: {kind: unet, channels: 8, channel_mult: [1], res_blocks: 1, attention_resolutions: []}
objective: {kind: ddpm_simple}
train: {steps: 4, batch_size: 16, log_every: 2}
restore:
  method:
    kind: replacement
    operator: {kind: inpaint, mask: center, box_size: 0.5}
  solver: {kind: ddim, steps: 5}
  n: 3
  samples_per_image: 2
evaluate: {metrics: []}
output: {root: {root}}
"""


@pytest.fixture(scope="module")
def restored(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return finished_run(tmp_path_factory.mktemp("restore"), SPEC)[1]


def test_the_restore_section_writes_figure_arrays_and_metrics(restored):
    assert (restored / "restore.png").is_file() and not (restored / "samples.png").exists()
    with np.load(restored / "restore.npz") as npz:
        truth, y, samples = npz["truth"], npz["measurement"], npz["samples"]
    assert truth.shape == (3, 1, 8, 8) and samples.shape == (6, 1, 8, 8)
    assert y.shape[0] == 3
    metrics = json.loads((restored / "metrics.json").read_text())["restore"]
    assert metrics["nfe"] == 5 and metrics["consistency"] < 1e-5  # noiseless: exact
    assert {"psnr", "ssim", "psnr_low", "ssim_high", "seconds"} <= set(metrics)
    spec = (restored / "spec.yaml").read_text()
    assert "replacement" in spec and "box_size: 0.5" in spec


def test_dkit_restore_on_a_finished_run(restored, capsys):
    code, out, err = run_cli(["restore", str(restored), "--operator",
                              "{kind: super_resolution, scale: 2, sigma_y: 0.05}", "--method",
                              "{kind: pigdm, data_std: 0.5}", "--n", "2", "--solver",
                              "{kind: ddim, steps: 3}"], capsys)
    assert code == 0, err
    folder = sorted((restored / "restoration").iterdir())[-1]
    assert folder.name.startswith("pigdm-super_resolution-")
    assert {p.name for p in folder.iterdir()} >= {"restore.png", "restore.npz", "restore.json"}
    assert "psnr" in out and "consistency" in out


@pytest.mark.parametrize(("method", "operator"), [
    ("{kind: ddrm, eta: 0.85, eta_b: 1}", "{kind: super_resolution, scale: 2, sigma_y: 0.05}"),
    ("ddnm", "{kind: inpaint, mask: center, box_size: 0.5}"),
    ("ddnm_plus", "{kind: blur, sigma: 1, sigma_y: 0.05}"),
])
def test_dkit_restore_with_ddrm_and_ddnm(restored, capsys, method, operator):
    """DDRM and DDNM+ take DDIM's steps (one network evaluation each); DDNM is a guidance
    term."""
    code, _, err = run_cli(["restore", str(restored), "--operator", operator, "--method",
                              method, "--n", "2", "--solver", "{kind: ddim, steps: 3}"], capsys)
    assert code == 0, err
    kind = next(k for k in ("ddrm", "ddnm_plus", "ddnm") if k in method)
    folder = sorted((restored / "restoration").glob(f"{kind}-*"))[-1]
    metrics = json.loads((folder / "restore.json").read_text())
    assert metrics["nfe"] == 3
    if kind == "ddnm":  # noiseless: the measurement exactly
        assert metrics["consistency"] < 1e-5


def test_dkit_restore_with_the_users_images(restored, tmp_path, capsys):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=images)
    code, _, err = run_cli(["restore", str(restored), "--operator", "denoise", "--method",
                            "dps", "--images", str(tmp_path / "mine.npz"), "--solver",
                            "{kind: ddim, steps: 2}", "restore.method.operator.sigma_y=0.1"],
                           capsys)
    assert code == 0, err
    (folder,) = (restored / "restoration").glob("dps-denoise-*")
    with np.load(folder / "restore.npz") as npz:
        assert np.allclose(npz["truth"], images)
    assert json.loads((folder / "spec.json").read_text())["method"]["operator"]["sigma_y"] == 0.1


@pytest.mark.parametrize(("args", "field", "expected"), [
    (["--operator", "{kind: inpaint, mask: /nowhere.npy}"], "restore.method.operator",
     "nowhere"),
    (["--operator", "colorize"], "restore.method.operator", "3"),
    (["--operator", "{kind: super_resolution, scale: 3}"], "restore.method.operator", "scale"),
    (["--operator", "{kind: denoise, sigma_y: -1}"], "restore.method.operator.sigma_y",
     "greater than or equal to 0"),
    (["--operator", "inpaint", "--method", "classifier_free"], "restore.method.operator",
     "unknown field"),
    (["--operator", "inpaint", "--method", "{kind: brightness}"], "restore.method.operator",
     "unknown field"),
    (["--operator", "inpaint", "--method", "dsp"], "restore.method.kind", "dps"),
    (["--operator", "{kind: inpaint"], "--operator", "YAML mapping"),
    (["--operator", "inpaint", "--images", "/nowhere.npz"], "restore.images", "existing"),
    (["--method", "dps"], "--operator", "forward model"),
    (["--operator", "inpaint", "--method", "ddrm", "--solver", "heun"], "restore.solver.kind",
     "DDRM takes the sampler's steps itself"),
    (["--operator", "inpaint", "--method", "ddnm_plus", "--solver", "ancestral"],
     "restore.solver.kind", "DDNMPlus takes the sampler's steps itself"),
    (["--operator", "inpaint", "--solver", "{kind: unipc, steps: 3, times: [1.0, 0.504, 0.501]}"],
     "restore.solver.times", "the same step 50 of this 100-step process"),
    (["--operator", "{kind: inpaint, sigma_y: 0}", "--method", "{kind: ddrm, eta_b: ddpm}"],
     "restore.method", "needs measurement noise"),
])
def test_bad_input_is_an_exit_2_naming_the_field(restored, capsys, args, field, expected):
    before = sorted((restored / "restoration").rglob("*")) if (
        restored / "restoration").exists() else []
    code, _, err = run_cli(["restore", str(restored), *args], capsys)
    assert code == 2, err
    assert field in err and expected in err, err
    assert "Traceback" not in err
    after = sorted((restored / "restoration").rglob("*")) if (
        restored / "restoration").exists() else []
    assert after == before  # nothing written


def test_restore_in_python_without_a_spec():
    """The same pieces from Python: an exact 2-D model, an operator, a method."""
    from diffusers_kit import Diffusion
    from diffusers_kit.guidance import Replacement
    from diffusers_kit.processes import VP
    from diffusers_kit.registry import get_registry
    from diffusers_kit.restore import restore
    from diffusers_kit.solvers import DDIM
    from tests.gaussian_mixture import ExactScoreNetwork, three_modes

    mixture = three_modes()
    diffusion = Diffusion(VP(), ExactScoreNetwork(mixture, VP()), device="cpu")
    forward = get_registry().build("forward_model", {"kind": "inpaint", "mask": "half"},
                                   data_shape=(2,))
    truth = mixture.sample(5, torch.Generator().manual_seed(0))
    result = restore(diffusion, Replacement(forward), truth, DDIM(steps=20), samples_per_image=4,
                     batch_size=7)
    assert result.samples.shape == (20, 2)
    assert result.nfe == result.metrics["nfe"] == 20  # per restoration, whatever the batches
    assert torch.allclose(result.samples[:, 0], truth[:, 0].repeat_interleave(4), atol=1e-5)
    assert result.metrics["consistency"] < 1e-5 and "psnr" not in result.metrics


def test_the_consistency_metric_in_a_spec(tmp_path, capsys):
    """`consistency` as an evaluate metric: restorations of held-out example i against its
    measurement; the held-out examples themselves score 0, random images do not."""
    from diffusers_kit.data.base import DataSplits
    from diffusers_kit.metrics import Consistency
    from diffusers_kit.registry import get_registry

    forward = get_registry().build("forward_model", {"kind": "inpaint", "mask": "center"},
                                   data_shape=(1, 8, 8))
    heldout = torch.rand(10, 1, 8, 8) * 2 - 1
    data = DataSplits(train=heldout, heldout=heldout)
    metric = Consistency(forward, resamples=50)
    assert metric.evaluate(heldout, data, torch.Generator())["consistency"] == 0
    noisy = metric.evaluate(torch.rand(10, 1, 8, 8) * 2 - 1, data, torch.Generator())
    assert noisy["consistency"] > 0.3 and noisy["consistency_low"] <= noisy["consistency"]
    spec = SPEC.replace("evaluate: {metrics: []}", "evaluate: {metrics: [{kind: consistency, "
                        "operator: {kind: inpaint, mask: center, box_size: 2.0}}]}")
    code, _, err = run_cli(["validate", "--build", str(write_spec(tmp_path, spec))], capsys)
    assert code == 2 and "evaluate.metrics[0].operator.box_size" in err, err

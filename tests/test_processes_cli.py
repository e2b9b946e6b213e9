"""``dkit process show``, process specs and registration."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, SubVP
from diffusers_kit.registry import get_registry
from tests.helpers import run_cli, write_spec


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps table cells to the terminal; a wide one keeps each figure on one line."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.parametrize(
    ("name", "cls"),
    [("ve", VE), ("vp", VP), ("subvp", SubVP), ("ddpm", DDPM), ("constant_sigma", ConstantSigma),
     ("ou", OU)],
)
def test_every_process_is_registered_with_its_defaults(name, cls):
    process = get_registry().build("process", {"kind": name})
    assert type(process) is cls
    assert repr(process) == repr(cls())


def test_spec_mapping_and_python_call_agree():
    registry = get_registry()
    built = registry.build("process", {"kind": "ddpm", "schedule": "cosine", "num_steps": 50})
    assert torch.equal(built.betas, DDPM(num_steps=50, schedule="cosine").betas)
    custom = registry.build("process", {"kind": "ddpm", "betas": [0.1, 0.2, 0.3]})
    assert custom.num_steps == 3
    assert custom.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    assert registry.build("process", {"kind": "vp"}).beta_min == 0.1
    assert registry.build("process", {"kind": "vp"}).beta_max == 20.0


def test_show_prints_the_key_figures(capsys):
    code, out, _ = run_cli(["process", "show", "ddpm"], capsys)
    assert code == 0
    assert "1000" in out  # T
    assert "4.0358e-05" in out  # abar_T of Ho et al.'s linear schedule
    assert "prior mismatch" in out and "nats/dim" in out
    assert "log-SNR" in out
    assert "quadratic" in out  # the ODE solvers' grid under spacing: auto
    code, out, _ = run_cli(["process", "show", "ve"], capsys)
    assert code == 0 and "log_snr" in out


def test_show_takes_parameters_and_writes_a_plot(capsys, tmp_path):
    png = tmp_path / "plots" / "vp.png"
    code, out, _ = run_cli(["process", "show", "vp", "beta_max=10", "--plot", str(png)], capsys)
    assert code == 0
    assert "beta_max=10.0" in out
    alpha_end = math.exp(-0.25 * (10 - 0.1) - 0.05)
    assert f"{alpha_end:.6g}" in out
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size[0] > 500 and image.size[1] > 500
        colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # alpha and sigma curves drawn


def test_show_reads_the_process_section_of_a_spec(capsys, tmp_path):
    spec = write_spec(tmp_path)  # a full spec with a ve process (sigma_max 8, 4 levels)
    code, out, _ = run_cli(["process", "show", str(spec)], capsys)
    assert code == 0
    assert "VE(sigma_min=0.01, sigma_max=8.0, num_levels=4)" in out
    code, out, _ = run_cli(["process", "show", str(spec), "process.sigma_max=3"], capsys)
    assert code == 0 and "sigma_max=3.0" in out
    partial = tmp_path / "only_process.yaml"
    partial.write_text("process:\n  kind: ddpm\n  num_steps: 0\n", encoding="utf-8")
    code, _, err = run_cli(["process", "show", str(partial)], capsys)
    assert code == 2
    assert "only_process.yaml:3" in err and "num_steps" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["vpp"], "did you mean 'vp'"),
        (["ddpm", "schedule=cosin"], "'linear', 'scaled_linear' or 'cosine'"),
        (["vp", "beta_max=-1"], "greater than 0"),
        (["vp", "bogus=1"], "unknown field 'bogus'"),
        (["vp", "beta_min=5", "beta_max=1"], "beta_max (1.0) must be at least beta_min"),
        (["ddpm", "betas=[0.1, 0.2]", "num_steps=3"], "process.num_steps: expected the number"),
        (["constant_sigma", "sigma=1e-5"], "steps to reach delta"),
    ],
)
def test_show_reports_user_errors_without_a_traceback(capsys, args, expected):
    code, out, err = run_cli(["process", "show", *args], capsys)
    assert code == 2
    assert expected in " ".join(err.split())
    assert "Traceback" not in err + out


def test_constructor_errors_in_python():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        DDPM(betas=[0.5, 1.0])
    with pytest.raises(ValueError, match="must exceed"):
        VE(sigma_min=2.0, sigma_max=1.0)

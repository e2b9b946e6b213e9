"""``spacing: auto``: the ODE solvers' default grid is the process's ``default_spacing``; and the
Heun steps of the EDM sampler stay bounded on it."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, SubVP
from diffusers_kit.solvers import DPMSolver2M, EDMStochastic, EulerODE, HeunODE, UniPC
from diffusers_kit.solvers.grids import resolve_spacing, sampling_times
from diffusers_kit.testing import MixtureTarget, three_modes
from tests.gaussian_mixture import exact_model

EXPECTED = [(DDPM(), "quadratic"), (DDPM(schedule="cosine"), "quadratic"), (VP(), "quadratic"),
            (SubVP(), "quadratic"), (VE(), "log_snr"), (OU(), "log_snr"),
            (ConstantSigma(), "log_snr")]


@pytest.mark.parametrize(("process", "spacing"), EXPECTED, ids=lambda v: repr(v)[:20])
def test_auto_is_the_processs_default_spacing(process, spacing):
    assert resolve_spacing(process, "auto") == spacing
    assert resolve_spacing(process, "uniform") == "uniform"  # a named grid is kept
    assert torch.equal(sampling_times(process, 7, "auto"), sampling_times(process, 7, spacing))
    for solver in (EulerODE(steps=7), HeunODE(steps=7), DPMSolver2M(steps=7), UniPC(steps=7),
                   EDMStochastic(steps=7)):
        assert solver.spacing == "auto"
        assert torch.equal(solver.table(process).times, sampling_times(process, 7, spacing))


class PluginProcess(VP):
    """A third party's process states its own grid, as the built-ins do."""

    default_spacing = "edm"


def test_a_plugin_process_chooses_its_grid():
    process = PluginProcess()
    assert torch.equal(EulerODE(steps=6).table(process).times,
                       sampling_times(process, 6, "edm"))


def test_a_bad_default_spacing_is_named():
    class Broken(VP):
        default_spacing = "cubic"

    with pytest.raises(ValueError, match=r"Broken\.default_spacing is 'cubic'"):
        sampling_times(Broken(), 5, "auto")


@pytest.mark.parametrize("form", ["data", "noise"])
def test_edm_without_churn_is_heun(form):
    """``S_churn: 0`` leaves Algorithm 2 as Algorithm 1: the same samples as ``heun`` in the
    same ``form``."""
    model = exact_model(three_modes(), VP())
    a = EDMStochastic(steps=8, S_churn=0.0, form=form).sample(
        model, (500, 2), generator=torch.Generator().manual_seed(1)).samples
    b = HeunODE(steps=8, form=form).sample(
        model, (500, 2), generator=torch.Generator().manual_seed(1)).samples
    assert torch.allclose(a, b, atol=1e-6)


def test_edm_with_few_steps_does_not_blow_up():
    """Ten steps of the EDM sampler on the cosine-schedule DDPM: the data-form Heun step (the
    default) lands within a few times the SWD floor on both grids (measured 1.2x on the default
    quadratic grid, 2.6x on equal log-SNR steps); the paper's trapezoid on eps multiplies the
    eps at the Euler point near sigma_min by a long step (366x and 8.7x)."""
    target = MixtureTarget(three_modes())
    model = exact_model(three_modes(), DDPM(schedule="cosine"))

    def ratio(solver) -> float:  # type: ignore[no-untyped-def]
        result = solver.sample(model, (2000, 2), generator=torch.Generator().manual_seed(0))
        return target.ratio(result.samples)

    for spacing in ("auto", "log_snr"):
        assert ratio(EDMStochastic(steps=10, spacing=spacing)) < 4.0, spacing
    assert ratio(EDMStochastic(steps=10, form="noise")) > 50.0  # what the default avoids

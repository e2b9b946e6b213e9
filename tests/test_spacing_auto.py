"""``spacing: auto``: the ODE solvers' default grid is the process's ``default_spacing``."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, SubVP
from diffusers_kit.solvers import DPMSolver2M, EDMStochastic, EulerODE, HeunODE, UniPC
from diffusers_kit.solvers.grids import resolve_spacing, sampling_times

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

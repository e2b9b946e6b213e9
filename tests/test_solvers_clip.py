"""``clip_x0``: every solver that forms the data prediction x0_hat clamps it to [-c, c] in one
place (``diffusers_kit.solvers.base.clip_data``) before the step uses it, as DDIM does (and as
DPM-Solver++ thresholds the data prediction of pixel-space models); None changes nothing."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from diffusers_kit.graph import build_components
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.processes import DDPM, VE
from diffusers_kit.solvers import DDIM, DPMSolver2M, DPMSolver3M, EulerODE, HeunODE, UniPC
from diffusers_kit.solvers.base import Record
from diffusers_kit.spec import SpecError, load_spec
from diffusers_kit.testing import ExactMixture, ExactScoreNetwork
from tests.gaussian_mixture import exact_model
from tests.test_specs import ROOT

#: data far outside [-1, 1]: the exact x0_hat is out of range from the first step to the last
FAR = ExactMixture(weights=[0.8, 0.2], means=[[-6.0, -3.0], [5.0, 4.0]],
                   stds=[[0.3, 0.2], [0.2, 0.3]])
MULTISTEP = {"dpm_solver_2m": DPMSolver2M, "dpm_solver_3m": DPMSolver3M, "unipc": UniPC,
             "unipc_order_3": partial(UniPC, order=3)}
SOLVERS = {**MULTISTEP, "euler": EulerODE, "heun": HeunODE, "ddim": DDIM}
PROCESSES = {"ddpm": DDPM, "ve": partial(VE, sigma_min=0.01, sigma_max=20.0)}
N = 256


def draw(solver, model, **kwargs):  # type: ignore[no-untyped-def]
    return solver.sample(model, (N, 2), generator=torch.Generator().manual_seed(5), **kwargs)


@pytest.mark.parametrize("process", PROCESSES, ids=list(PROCESSES))
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
@pytest.mark.parametrize("name", SOLVERS, ids=list(SOLVERS))
def test_clip_x0_keeps_the_data_prediction_and_the_samples_in_range(name, steps, process):
    model = exact_model(FAR, PROCESSES[process]())
    make = SOLVERS[name]
    free = draw(make(steps=steps), model).samples
    assert free.abs().max() > 3.0  # without the clamp the samples leave [-1, 1] far behind
    clip = 0.5
    result = draw(make(steps=steps, clip_x0=clip, record=Record(what=("x0",), snapshots=steps)),
                  model)
    assert torch.isfinite(result.samples).all()
    assert result.samples.abs().max() <= clip
    assert result.x0_predictions
    for x0 in result.x0_predictions:  # the x0_hat each step used
        assert x0.abs().max() <= clip


class ClampedX0(Network):
    """The exact network whose x0 prediction is itself clamped to [-c, c]."""

    def __init__(self, mixture: ExactMixture, process, clip: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__("x0")
        self.inner = ExactScoreNetwork(mixture, process, "x0")
        self.data_shape, self.clip = self.inner.data_shape, clip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t).clamp(-self.clip, self.clip)


@pytest.mark.parametrize("name", MULTISTEP, ids=list(MULTISTEP))
def test_the_multistep_update_sees_only_clamped_predictions(name):
    """Clamping inside the solver equals running it unclamped on a model whose x0 prediction is
    clamped: every data prediction (the corrector's included) is clamped before any update."""
    process = DDPM()
    inside = draw(MULTISTEP[name](steps=10, clip_x0=1.0), exact_model(FAR, process)).samples
    model = ScoreModel(process, ClampedX0(FAR, process, 1.0))
    outside = draw(MULTISTEP[name](steps=10), model).samples
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-5)


@pytest.mark.parametrize("process", PROCESSES, ids=list(PROCESSES))
@pytest.mark.parametrize("name", SOLVERS, ids=list(SOLVERS))
def test_a_clamp_that_never_binds_changes_nothing(name, process):
    """The default is off, and a bound no prediction reaches leaves the samples bit for bit
    (the multistep solvers) or to rounding (euler, heun and DDIM take their steps in the data
    form when clip_x0 is set, DDIM's fused step otherwise; the same steps)."""
    model = exact_model(FAR, PROCESSES[process]())
    make = SOLVERS[name]
    assert make().clip_x0 is None
    base = draw(make(steps=8), model).samples
    assert torch.equal(base, draw(make(steps=8, clip_x0=None), model).samples)
    loose = draw(make(steps=8, clip_x0=1e6), model).samples
    if name in ("euler", "heun", "ddim"):
        torch.testing.assert_close(loose, base, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(loose, base)


def test_heun_clamps_only_in_its_data_form():
    with pytest.raises(ValueError, match="form: data"):
        HeunODE(form="noise", clip_x0=1.0)


@pytest.mark.parametrize("kind", ["dpm_solver_2m", "dpm_solver_3m", "unipc", "euler", "heun"])
def test_clip_x0_is_accepted_through_a_spec(kind):
    solver = f"sample.solver={{kind: {kind}, steps: 20, clip_x0: 1.0}}"
    spec, document = load_spec(ROOT / "specs" / "cfg_digits.yaml", ["device=cpu", solver])
    components = build_components(spec, document)
    assert components.solver.clip_x0 == 1.0
    with pytest.raises(SpecError, match="clip_x0"):
        load_spec(ROOT / "specs" / "cfg_digits.yaml",
                  ["device=cpu", f"sample.solver={{kind: {kind}, clip_x0: 0}}"])

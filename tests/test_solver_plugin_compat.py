"""A solver written as the 0.1 docs showed keeps working (plugin API 1.0 is a promise).

The 0.1 shape: the solver declares its own ``keep_trajectory`` / ``keep_x0`` / ``snapshots``
constructor parameters and runs its own ``sample`` loop, recording ``x`` itself into the
``SampleResult``. The plugin below is installed like a third party's (a distribution with a
``diffusers_kit`` entry point whose module registers through the pluggy hook), validated in a
spec, and sampled through :meth:`Diffusion.sample`.
"""

from __future__ import annotations

import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import torch

from diffusers_kit import registry as registry_module
from diffusers_kit.diffusion import Diffusion
from diffusers_kit.processes import VP
from diffusers_kit.spec import load_spec
from diffusers_kit.testing import ExactScoreNetwork, MixtureTarget, three_modes
from tests.test_plugins import _fake_distribution

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess
    from diffusers_kit.solvers.base import Progress
    from diffusers_kit.solvers.noise import Noise

PLUGIN = '''
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit import hookimpl
from diffusers_kit.solvers.base import SampleResult, Solver, model_device


class OldEuler(Solver):
    """DDIM (eta = 0) on equal steps in t, as a 0.1 plugin wrote it.

    Args:
        steps: number of steps.
        keep_trajectory: also return x at ``snapshots`` evenly spaced steps.
        keep_x0: also return x0_hat at those steps.
        snapshots: how many steps to record when asked.
    """

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1)] = 50,
        keep_trajectory: bool = False,
        keep_x0: bool = False,
        snapshots: Annotated[int, Field(ge=1)] = 10,
    ) -> None:
        self.steps = steps
        self.keep_trajectory = keep_trajectory
        self.keep_x0 = keep_x0
        self.snapshots = snapshots

    def total_steps(self, process):
        return self.steps

    @torch.no_grad()
    def sample(self, model, shape, *, generator=None, progress=None, noise=None, x_T=None):
        process, device = model.process, model_device(model)
        x = x_T.to(device) if x_T is not None else (
            noise.randn(shape, device=device) if noise is not None
            else torch.randn(shape, generator=generator, device=device))
        times = torch.linspace(1.0, process.t_min, self.steps, dtype=torch.float64)
        times = torch.cat([times, torch.zeros(1, dtype=torch.float64)])
        alpha, sigma = process.marginal(times)
        sigma[-1] = 0.0
        every = max(1, self.steps // self.snapshots)
        trajectory, x0s, recorded = [], [], []
        begin = model.nfe
        for i in range(self.steps):
            t = torch.full((shape[0],), float(times[i]), device=device)
            eps = model.predict(x, t, "eps")
            x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
            if i % every == 0:
                if self.keep_trajectory:
                    trajectory.append(x.clone())
                if self.keep_x0:
                    x0s.append(x0.clone())
                recorded.append(float(times[i]))
            x = float(alpha[i + 1]) * x0 + float(sigma[i + 1]) * eps
            if progress is not None:
                progress(1)
        return SampleResult(x, model.nfe - begin, trajectory, x0s, recorded)


@hookimpl
def dkit_register(registry):
    registry.add("solver", "old_euler", OldEuler)
'''

SPEC = """
name: old-solver
process: {kind: vp}
data: {kind: two_moons}
network: {kind: mlp}
objective: {kind: dsm}
train: {steps: 1}
sample:
  n: 8
  solver: {kind: old_euler, steps: 40, keep_trajectory: true, snapshots: 4}
"""


@pytest.fixture
def old_plugin(tmp_path, monkeypatch):
    registry_module.reset_registry()
    module = tmp_path / "src" / "dkit_old_solver.py"
    module.parent.mkdir(parents=True)
    module.write_text(textwrap.dedent(PLUGIN))
    _fake_distribution(tmp_path / "site", "dkit-old-solver",
                       "[diffusers_kit]\nold = dkit_old_solver\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield registry_module.get_registry()
    registry_module.reset_registry()
    sys.modules.pop("dkit_old_solver", None)


def test_a_0_1_solver_imports_registers_validates_samples_and_records(old_plugin, tmp_path):
    assert not old_plugin.plugin_errors, old_plugin.plugin_errors
    component = old_plugin.get("solver", "old_euler")
    assert component.source == "dkit-old-solver"
    # its own keep_* parameters are its schema; the base class's record joins them
    assert {"steps", "keep_trajectory", "keep_x0", "snapshots", "record"} <= set(
        component.params.model_fields)

    (tmp_path / "old.yaml").write_text(SPEC)
    spec, _ = load_spec(tmp_path / "old.yaml", [])
    solver = old_plugin.build("solver", dict(spec.sample.solver))
    assert type(solver).__name__ == "OldEuler" and solver.keep_trajectory and not solver.keep_x0

    mixture, process = three_modes(), VP()
    diffusion = Diffusion(process, ExactScoreNetwork(mixture, process), device="cpu")
    result = diffusion.sample(2000, solver, seed=0, batch_size=700)
    assert result.nfe == 3 * 40  # three batches of its own loop
    # its own records, batch by batch joined per snapshot
    assert len(result.trajectory) == 4 and result.trajectory[0].shape == (2000, 2)
    # the trajectory starts at the prior draw and the samples reach the mixture
    assert abs(float(result.trajectory[0].std()) - 1.0) < 0.05
    assert MixtureTarget(mixture, 2000).ratio(result.samples) < 2.0

    # and a 1.0 caller's record option reaches it too
    recorded = old_plugin.build("solver", {"kind": "old_euler", "steps": 10,
                                           "record": {"what": ["x0"], "snapshots": 2}})
    assert recorded.keep_x0 and not recorded.keep_trajectory


def test_a_1_0_solver_that_overrides_sample_is_called_through_it():
    """The 1.0 template's shape (``dkit new-plugin`` before the loop contract): its own
    ``sample`` with ``as_noise``, ``start``, a ``Recorder`` and ``model.nfe``; the driver
    leaves it alone and ``Diffusion.sample`` batches, counts and records through it."""
    from typing import Annotated

    from pydantic import Field

    from diffusers_kit.solvers.base import Recorder, SampleResult, Solver, as_noise, start

    class EulerMaruyamaSDE(Solver):
        """Euler-Maruyama on the reverse-time SDE, ending with a denoising step.

        Args:
            steps: Euler-Maruyama steps from t = 1 to the process's t_min (one network
                evaluation each, plus one for the final denoising step).
        """

        def __init__(self, steps: Annotated[int, Field(ge=1, le=100_000)] = 500) -> None:
            self.steps = steps

        def total_steps(self, process: NoiseProcess) -> int:
            return self.steps

        @torch.no_grad()
        def sample(self, model: ScoreModel, shape: tuple[int, ...], *,
                   generator: torch.Generator | None = None, progress: Progress | None = None,
                   noise: Noise | None = None, x_T: torch.Tensor | None = None) -> SampleResult:
            process = model.process
            source = as_noise(generator, noise)
            x = start(model, shape, source, x_T)
            grid = process.time_grid(self.steps)  # float64, decreasing from 1 to t_min
            times = grid.tolist()  # host floats, computed once: no synchronisation in the loop
            g2 = (process.diffusion(grid) ** 2).tolist()
            recorder = Recorder(self.steps, self.record, times)
            nfe_before = model.nfe
            for i in range(self.steps):
                t = torch.full((shape[0],), times[i], device=x.device, dtype=x.dtype)
                h = times[i] - times[i + 1]
                score = model.predict(x, t, "score")
                x = x - (process.drift(x, t) - g2[i] * score) * h
                x = x + (g2[i] * h) ** 0.5 * source.randn(shape, device=x.device, dtype=x.dtype)
                recorder.record(i, x)
                if progress is not None:
                    progress(1)
            t = torch.full((shape[0],), times[-1], device=x.device, dtype=x.dtype)
            samples = model.predict(x, t, "x0")
            return recorder.result(samples, model.nfe - nfe_before)

    mixture, process = three_modes(), VP()
    solver = EulerMaruyamaSDE(steps=200, record={"what": ["x"], "snapshots": 3})
    diffusion = Diffusion(process, ExactScoreNetwork(mixture, process), device="cpu")
    result = diffusion.sample(2000, solver, seed=0, batch_size=1000)
    assert result.nfe == 2 * 201 and len(result.trajectory) == 3
    assert MixtureTarget(mixture, 2000).ratio(result.samples) < 1.5

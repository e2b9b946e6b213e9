"""The plugin authors' testing kit (diffusers_kit.testing) passes every built-in component and
fails broken ones with a message that says what the protocol expects. (The process identities
are also what tests/test_processes_*.py check, with hypothesis-drawn times; the mixture target
is tests/test_solvers_analytic.py's.)"""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.data.toy2d import TwoMoons
from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.metrics import SlicedWasserstein
from diffusers_kit.processes import VP
from diffusers_kit.registry import get_registry
from diffusers_kit.solvers import DDIM
from diffusers_kit.testing import (
    check_forward_model,
    check_metric,
    check_process,
    check_registered,
    check_solver,
    check_solver_on_mixture,
)

FAST = {"ancestral": {"steps": 200}, "predictor_corrector": {"steps": 200},
        "repaint": {"resampling": 2}}


@pytest.mark.parametrize("name", [c.name for c in get_registry().components("solver")])
def test_every_registered_solver_passes_the_kit(name):
    solver = get_registry().build("solver", {"kind": name, **FAST.get(name, {})})
    check_solver(solver, n=1000)


@pytest.mark.parametrize("name", [c.name for c in get_registry().components("forward_model")])
def test_every_registered_operator_passes_the_kit(name):
    for shape in ((1, 8, 8), (3, 8, 8), (2,)):
        try:
            operator = get_registry().build("forward_model", {"kind": name}, data_shape=shape)
        except ValueError:
            continue
        check_forward_model(operator)


def test_check_metric_and_check_registered():
    data = TwoMoons(n_train=500, n_heldout=500).load()
    values = check_metric(SlicedWasserstein(projections=64), data)
    assert "swd" in values
    assert check_registered("process", "vp") is not None
    assert check_registered("forward_model", "inpaint", data_shape=(1, 8, 8)) is not None


def test_the_kit_catches_a_solver_that_bypasses_the_model():
    class Bypass(DDIM):  # samples the bare network: guidance would never reach it
        def sample(self, model, shape, **kwargs):  # type: ignore[no-untyped-def]
            from diffusers_kit.model import ScoreModel

            return super().sample(ScoreModel(model.process, model.network), shape, **kwargs)

    with pytest.raises(AssertionError, match="the model it is given"):
        check_solver(Bypass(steps=20), n=500)


def test_the_kit_catches_a_wrong_adjoint():
    class Doubled(ForwardModel):
        def A(self, x):  # type: ignore[no-untyped-def]
            return 2 * x

        def A_adjoint(self, y):  # type: ignore[no-untyped-def]
            return y  # should be 2 y

    with pytest.raises(AssertionError, match="not the adjoint"):
        check_forward_model(Doubled(data_shape=(4,)))


def test_the_kit_catches_a_solver_with_the_wrong_variance():
    class Hot(DDIM):
        def sample(self, model, shape, **kwargs):  # type: ignore[no-untyped-def]
            result = super().sample(model, shape, **kwargs)
            result.samples = result.samples * torch.tensor(1.5)
            return result

    with pytest.raises(AssertionError, match="variance"):
        check_solver(Hot(steps=20), n=1000)


@pytest.mark.parametrize("name", [c.name for c in get_registry().components("process")
                                  # those that need a setting (diffusers_scheduler's path)
                                  # are checked where their tests build one
                                  if not any(f.is_required()
                                             for f in c.params.model_fields.values())])
def test_every_registered_process_passes_the_process_identities(name):
    check_process(get_registry().build("process", {"kind": name}))


def test_the_kit_catches_a_process_whose_sde_disagrees_with_its_marginal():
    class FastNoise(VP):  # the SDE of a process twice as fast as its marginal says
        def beta(self, t):  # type: ignore[no-untyped-def]
            return 2 * super().beta(t)

    with pytest.raises(AssertionError, match=r"the forward SDE .* converges to"):
        check_process(FastNoise())


def test_the_kit_catches_a_wrong_posterior():
    class Overconfident(VP):
        def posterior_coefficients(self, t, s):  # type: ignore[no-untyped-def]
            c_t, c_0, var = super().posterior_coefficients(t, s)
            return c_t, c_0, var / 2

    with pytest.raises(AssertionError, match="posterior: variance"):
        check_process(Overconfident())


def test_check_solver_on_mixture_passes_ddim_and_catches_one_step():
    assert check_solver_on_mixture(DDIM()) < 1.5
    with pytest.raises(AssertionError, match="times the noise floor"):
        check_solver_on_mixture(DDIM(steps=1))

"""The plugin authors' testing kit (diffusers_kit.testing) passes every built-in component and
fails broken ones with a message that says what the protocol expects."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.data.toy2d import TwoMoons
from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.metrics import SlicedWasserstein
from diffusers_kit.registry import get_registry
from diffusers_kit.solvers import DDIM
from diffusers_kit.testing import (
    check_forward_model,
    check_metric,
    check_registered,
    check_solver,
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

"""The loops' fast paths give what the plain formulas give: noise drawn like the state, the
predictors' steps from eps_hat (the score folded into their coefficients), the cached 0-dim
coefficient tensors, and a plugin predictor that overrides ``step`` keeping its own step."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.processes import DDPM, VE, VP
from diffusers_kit.solvers import (
    AncestralPredictor,
    EulerMaruyama,
    PredictorCorrector,
    ReverseDiffusion,
)
from diffusers_kit.solvers.grids import as_scalars
from diffusers_kit.solvers.noise import GeneratorNoise, PerSampleNoise
from diffusers_kit.solvers.sde import Predictor, eps_step, predictor_rows
from diffusers_kit.solvers.tables import step_table
from tests.gaussian_mixture import exact_model, three_modes


@pytest.mark.parametrize("make", [lambda: GeneratorNoise(None),
                                  lambda: GeneratorNoise(torch.Generator().manual_seed(4)),
                                  lambda: PerSampleNoise(9)])
def test_randn_like_draws_what_randn_draws(make):
    """``randn_like(x)`` is ``randn(x.shape, device=x.device, dtype=x.dtype)``, number for
    number, also for a non-contiguous ``x`` (the draw is laid out contiguously)."""
    for x in (torch.zeros(7, 3), torch.zeros(3, 7).t()):
        torch.manual_seed(11)
        first = make().randn_like(x)
        torch.manual_seed(11)
        second = make().randn(x.shape, device=x.device, dtype=x.dtype)
        assert torch.equal(first, second)
        assert first.is_contiguous()


@pytest.mark.parametrize("predictor", [EulerMaruyama(), ReverseDiffusion(),
                                       AncestralPredictor("posterior"),
                                       AncestralPredictor("transition")])
@pytest.mark.parametrize("process", [DDPM(), VP(), VE()])
def test_step_from_eps_is_the_step_from_the_score(predictor, process):
    table = step_table(process, 10)
    rows = predictor_rows(table, torch.zeros(1))  # float32 on the CPU
    generator = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(50, 2, generator=generator) for _ in range(3))
    from_eps = eps_step(predictor)
    assert from_eps is not None
    for i in (0, 4, table.steps - 1):
        noise = None if i == table.steps - 1 else z
        score = eps * (-1.0 / rows["sigma_t"][i])
        plain = predictor.step(x, score, table.rows, i, noise)  # float rows only
        fast = from_eps(x, eps, rows, i, noise)
        assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max())), i


def test_a_predictor_that_overrides_step_keeps_its_own_step():
    class Halt(AncestralPredictor):
        def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
            return torch.zeros_like(x)

    class Plugin(Predictor):  # a plugin's predictor: a step and no step_eps
        def step(self, x, score, c, i, z):  # type: ignore[no-untyped-def]
            return x + 0 * score

    assert eps_step(Halt()) is None
    assert eps_step(Plugin()) is None
    assert eps_step(AncestralPredictor()) is not None
    model = exact_model(three_modes(), DDPM())
    samples = PredictorCorrector(Halt(), steps=5).sample(model, (8, 2)).samples
    assert torch.equal(samples, torch.zeros(8, 2))


def test_coefficient_tensors_are_cached_per_device_and_dtype():
    cache: dict = {}  # a grid's
    values = [0.5, 0.25]
    first = as_scalars(cache, "probe", values, torch.zeros(1))
    again = as_scalars(cache, "probe", values, torch.zeros(1))
    other = as_scalars(cache, "probe", values, torch.zeros(1, dtype=torch.float64))
    assert first is again and len(cache) == 2
    assert [t.dtype for t in first] == [torch.float32] * 2 and other[1].dtype == torch.float64
    assert [float(t) for t in first] == [0.5, 0.25]
    x = torch.randn(6, 2)
    assert torch.equal(x * first[0], x * 0.5)  # the same product as by the float

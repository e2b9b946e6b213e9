"""A testing kit for plugin authors: the contract checks dkit applies to its own components,
callable from a plugin's tests.

>>> from diffusers_kit.testing import check_solver, check_forward_model, check_metric
>>> check_solver(MySolver())                  # doctest: +SKIP
>>> check_forward_model(MyOperator(data_shape=(1, 8, 8)))   # doctest: +SKIP

Each check raises ``AssertionError`` with a message that says what the protocol expects. They
use exact answers, so a pass means the component is right, not merely that it runs:

- :func:`check_solver` drives the solver with the exact score of standard normal data (any
  process: the noised marginal of ``N(0, I)`` is ``N(0, alpha^2 + sigma^2)``), so its samples
  must have mean 0 and variance 1; it also checks the shape, ``nfe`` and that guidance reaches
  it through the model (a term that shifts the score must shift the samples);
- :func:`check_forward_model` checks ``<A x, y> = <x, A^T y>``, the SVD when there is one and
  the pseudo-inverse;
- :func:`check_metric` checks that the result is a dict of numbers, that a set scored against
  itself is no worse than a shifted copy;
- :func:`check_registered` checks that a component is registered (through the entry point the
  plugin declares), builds from its defaults, and has a JSON Schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.guidance.base import GradientGuidance
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network

if TYPE_CHECKING:
    from diffusers_kit.forward_models.base import ForwardModel
    from diffusers_kit.metrics.base import Metric
    from diffusers_kit.processes.base import NoiseProcess
    from diffusers_kit.solvers.base import Solver


class StandardNormalScore(Network):
    """The exact eps of standard normal data under any process: ``eps = sigma x / (alpha^2 +
    sigma^2)`` (the score of ``N(0, alpha^2 + sigma^2)`` times ``-sigma``)."""

    def __init__(self, process: NoiseProcess, data_shape: tuple[int, ...]) -> None:
        super().__init__("eps")
        self.process, self.data_shape = process, tuple(data_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(t.double())
        scale = (sigma / (alpha**2 + sigma**2)).to(x.dtype)
        return scale.reshape(-1, *([1] * (x.dim() - 1))) * x


class _Shift(GradientGuidance):
    """``+ scale * 1``: a constant pull, whose effect on the samples any solver must show."""

    needs_labels = False

    def gradient(self, model, x, t, y):  # type: ignore[no-untyped-def]
        return torch.ones_like(x)


def check_solver(solver: Solver, process: NoiseProcess | None = None, n: int = 2000,
                 data_shape: tuple[int, ...] = (2,), seed: int = 0) -> None:
    """The solver samples standard normal data from its exact score: shape, finite values,
    ``nfe`` counted, mean 0 and variance 1 within a tolerance set for ``n``, and guidance
    reaching it through the model. ``process`` defaults to the first built-in one the solver's
    ``check`` accepts (``ddpm``, ``vp``, ``ve`` with levels)."""
    from diffusers_kit.processes import DDPM, VE, VP

    if process is None:
        for candidate in (DDPM(), VP(), VE(sigma_min=0.01, sigma_max=20.0, num_levels=20)):
            if solver.check(candidate) is None:
                process = candidate
                break
        assert process is not None, (f"{type(solver).__name__}.check refuses ddpm, vp and ve: "
                                     "pass the process it samples")
    reason = solver.check(process)
    assert reason is None, f"{type(solver).__name__}.check refuses {type(process).__name__}: "\
                           f"{reason}"
    model = ScoreModel(process, StandardNormalScore(process, data_shape))
    shape = (n, *data_shape)
    result = solver.sample(model, shape, generator=torch.Generator().manual_seed(seed))
    name = type(solver).__name__
    samples = result.samples
    assert tuple(samples.shape) == shape, f"{name}.sample returned shape " \
                                          f"{tuple(samples.shape)} for {shape}"
    assert torch.isfinite(samples).all(), f"{name}.sample returned non-finite values"
    assert isinstance(result.nfe, int) and result.nfe > 0, f"{name}: nfe must count the " \
        f"network evaluations (model.nfe after minus before), got {result.nfe!r}"
    assert result.nfe == model.nfe, f"{name}: nfe {result.nfe} but the model it is given " \
        f"was called {model.nfe} times (ask that model, whose predictions carry guidance)"
    flat = samples.double().flatten(1)
    tolerance = 6 / n**0.5  # six standard errors of a mean of n unit variables
    assert flat.mean(0).abs().max() < tolerance, \
        f"{name}: the samples' mean is {flat.mean(0).tolist()}, not 0 (standard normal data)"
    assert (flat.var(0) - 1).abs().max() < 0.15, \
        f"{name}: the samples' variance is {flat.var(0).tolist()}, not 1 (standard normal data)"
    guided = solver.sample(model.guided([_Shift(scale=1.0)]), shape,
                           generator=torch.Generator().manual_seed(seed)).samples
    assert guided.double().mean() > samples.double().mean() + 0.2, \
        f"{name}: a guidance term that pulls every sample up changed nothing: the solver must " \
        "ask the model it is given (model.predict / model.score), not the network"


def check_forward_model(operator: ForwardModel, batch: int = 3, seed: int = 0) -> None:
    """``<A x, y> = <x, A^T y>`` to 1e-9 in float64; the SVD reproduces A when there is one;
    ``A A^+ A = A``; ``simulate`` adds noise of std ``sigma_y``."""
    name = type(operator).__name__
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *operator.data_shape, generator=g, dtype=torch.float64)
    y = torch.randn(batch, *operator.measurement_shape, generator=g, dtype=torch.float64)
    ax, aty = operator.A(x), operator.A_adjoint(y)
    assert tuple(ax.shape) == (batch, *operator.measurement_shape), f"{name}.A: shape " \
                                                                   f"{tuple(ax.shape)}"
    assert tuple(aty.shape) == tuple(x.shape), f"{name}.A_adjoint: shape {tuple(aty.shape)}"
    lhs, rhs = (ax * y).flatten(1).sum(1), (x * aty).flatten(1).sum(1)
    scale = ax.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert ((lhs - rhs).abs() <= 1e-9 * scale).all(), \
        f"{name}: A_adjoint is not the adjoint of A (<Ax, y> = {lhs.tolist()}, <x, A^T y> = " \
        f"{rhs.tolist()})"
    if operator.has_svd:
        s = operator.singulars()
        z = operator.Vt(x)[:, : s.numel()] * s
        full = torch.nn.functional.pad(z, (0, operator.m - s.numel()))
        assert torch.allclose(operator.U(full), ax, atol=1e-9, rtol=1e-7), \
            f"{name}: U diag(s) V^T x differs from A x"
        assert torch.allclose(operator.V(operator.Vt(x)), x, atol=1e-9), f"{name}: V is not " \
                                                                          "orthogonal"
    assert torch.allclose(operator.A(operator.pinv(ax)), ax, atol=1e-7, rtol=1e-6), \
        f"{name}: A A^+ A differs from A"


def check_metric(metric: Metric, data: DataSplits, generator_seed: int = 0,
                 name: str | None = None) -> dict[str, Any]:
    """The metric returns a dict of numbers; the held-out set scored against itself is no
    worse than the same set shifted by half its spread (for the metric's first value, lower
    is taken as better unless ``higher_is_better`` is set on the metric). Returns the result
    on the held-out set."""
    from diffusers_kit.graph import checked_metric

    label = name or type(metric).__name__
    real = metric.evaluate(data.heldout, data, torch.Generator().manual_seed(generator_seed))
    values = checked_metric(label, metric, real)
    assert values, f"{label}.evaluate returned no values"
    key = next(iter(values))
    spread = data.heldout.double().std().item()
    shifted = checked_metric(label, metric, metric.evaluate(
        data.heldout + 0.5 * spread, data, torch.Generator().manual_seed(generator_seed)))
    better = getattr(metric, "higher_is_better", False)
    same, other = values[key], shifted[key]
    assert (same >= other) if better else (same <= other), \
        f"{label}: {key} is {same} for the held-out set itself and {other} for a shifted copy"
    return values


def check_registered(kind: str, name: str, **context: Any) -> Any:
    """The component is registered (e.g. through the plugin's entry point), builds from its
    defaults (``context``: what the run graph would pass, e.g. ``data_shape=(1, 8, 8)``) and
    has a JSON Schema. Returns the built component."""
    from diffusers_kit.registry import get_registry
    from diffusers_kit.spec.schema import spec_schema

    registry = get_registry()
    component = registry.get(kind, name)
    built = registry.build(kind, {"kind": name}, **context)
    problems: list[str] = []
    schema = spec_schema(registry, {component.source}, problems)
    assert not [p for p in problems if f"{name!r}" in p], problems
    names = {o["properties"]["kind"]["const"] for o in schema["$defs"][kind].get("oneOf", [])}
    assert name in names, f"{kind} {name!r} is missing from the JSON Schema"
    return built


__all__ = ["StandardNormalScore", "check_forward_model", "check_metric", "check_registered",
           "check_solver"]

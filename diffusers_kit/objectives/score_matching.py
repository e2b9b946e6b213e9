"""Score matching without noise targets: implicit (Hyvarinen 2005) and sliced (Song et al. 2019).

Implicit score matching. For a model score ``s(x)`` of data density ``p``, integrating the
explicit objective ``1/2 E || s(x) - grad log p(x) ||^2`` by parts leaves (Hyvarinen 2005, Thm 1)::

    J(theta) = E_p [ 1/2 || s(x) ||^2 + tr grad_x s(x) ] + const

The trace of the Jacobian costs one backward pass per dimension (exact, for small dimension) or
is estimated without bias by Hutchinson's estimator ``tr A = E_v[v^T A v]`` for probes with
``E[v v^T] = I`` (Rademacher or Gaussian), one backward pass per probe (Hutchinson 1989).

Sliced score matching (Song, Garg, Shi & Ermon 2019, eq. 7) projects onto random directions::

    J(theta) = E_p E_v [ v^T grad_x s(x) v + 1/2 (v^T s(x))^2 ]

and its variance-reduced form (SSM-VR, eq. 8) replaces ``E_v (v^T s)^2`` by ``|| s ||^2``.

Both objectives are stated for the density the model's score refers to: the data are noised to
the process's time ``time`` (default the process's ``t_min``, where ``q_t`` is closest to the
data), so that the trained model's ``score(x, time)`` is what a Langevin sampler at that time
needs. For the VE process at ``t = 0`` that is ``sigma_min`` (e.g. 0.01) of noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import Objective

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

Tensor = torch.Tensor


def probe_vectors(shape: tuple[int, ...], kind: str, *, device: torch.device,
                  dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """Random probes with ``E[v v^T] = I``: Rademacher (+-1) or standard Gaussian."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, device=device, generator=generator)
        return (2 * bits - 1).to(dtype)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def jacobian_trace_exact(s: Tensor, x: Tensor, *, create_graph: bool = True) -> Tensor:
    """``tr d s / d x`` per example by one backward pass per dimension; ``(B,)``."""
    flat = s.flatten(1)
    trace = torch.zeros(s.shape[0], device=s.device, dtype=s.dtype)
    for i in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph,
                                      retain_graph=True)
        trace = trace + grad.flatten(1)[:, i]
    return trace


def jacobian_quadratic_form(s: Tensor, x: Tensor, v: Tensor, *, create_graph: bool = True
                            ) -> Tensor:
    """``v^T (d s / d x) v`` per example with one vector-Jacobian product; ``(B,)``.

    ``grad_x (v . s) = J^T v`` (rows of the batch are independent), so ``v . (J^T v) = v^T J v``.
    """
    (vjp,) = torch.autograd.grad((s * v).sum(), x, create_graph=create_graph)
    return (vjp * v).flatten(1).sum(1)


def jacobian_trace_hutchinson(s: Tensor, x: Tensor, probes: int, kind: str, *,
                              generator: torch.Generator | None = None,
                              create_graph: bool = True) -> Tensor:
    """Hutchinson's unbiased estimate of ``tr d s / d x``: the mean of ``v^T J v`` over
    ``probes`` independent probes; ``(B,)``."""
    total = torch.zeros(s.shape[0], device=s.device, dtype=s.dtype)
    for _ in range(probes):
        v = probe_vectors(tuple(x.shape), kind, device=x.device, dtype=x.dtype,
                          generator=generator)
        total = total + jacobian_quadratic_form(s, x, v, create_graph=create_graph)
    return total / probes


class _NoiseFreeObjective(Objective):
    """Shared part: noise the data to ``time`` and evaluate the per-example loss there."""

    time: float | None = None
    differentiates_twice = True

    def loss(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
             labels: Tensor | None = None) -> Tensor:
        process = model.process
        time = process.t_min if self.time is None else self.time
        t = torch.full((x0.shape[0],), float(time), device=x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x, _ = process.marginal_sample(x0, t, noise)
        return self.per_example(model, x, t, generator, labels).mean()

    def per_example(self, model: ScoreModel, x: Tensor, t: Tensor,
                    generator: torch.Generator | None = None,
                    labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class ImplicitScoreMatching(_NoiseFreeObjective):
    """Implicit score matching, E[1/2 ||s(x)||^2 + tr grad_x s(x)] (Hyvarinen 2005).

    Args:
        trace: ``exact`` (one backward pass per dimension), ``hutchinson`` (random probes), or
            ``auto``: exact up to ``exact_max_dim`` dimensions, Hutchinson above.
        probes: Hutchinson probes per example.
        probe: probe distribution: ``rademacher`` (lowest variance) or ``gaussian``.
        exact_max_dim: largest dimension ``auto`` computes exactly.
        time: process time the data are noised to and the score is taken at (default t_min).
    """

    def __init__(
        self,
        trace: Literal["auto", "exact", "hutchinson"] = "auto",
        probes: Annotated[int, Field(ge=1, le=1024)] = 1,
        probe: Literal["rademacher", "gaussian"] = "rademacher",
        exact_max_dim: Annotated[int, Field(ge=1, le=4096)] = 16,
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
    ) -> None:
        self.trace = trace
        self.probes = probes
        self.probe = probe
        self.exact_max_dim = exact_max_dim
        self.time = time

    def uses_exact_trace(self, dim: int) -> bool:
        return self.trace == "exact" or (self.trace == "auto" and dim <= self.exact_max_dim)

    def per_example(self, model: ScoreModel, x: Tensor, t: Tensor,
                    generator: torch.Generator | None = None,
                    labels: Tensor | None = None) -> Tensor:
        """``1/2 ||s(x)||^2 + tr grad_x s(x)`` per example at time ``t``; ``(B,)``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            s = model.score(x, t, labels)
            if self.uses_exact_trace(x[0].numel()):
                trace = jacobian_trace_exact(s, x)
            else:
                trace = jacobian_trace_hutchinson(s, x, self.probes, self.probe,
                                                  generator=generator)
            return 0.5 * s.flatten(1).pow(2).sum(1) + trace


class SlicedScoreMatching(_NoiseFreeObjective):
    """Sliced score matching, E_v[v^T grad_x s v + 1/2 (v^T s)^2] (Song et al. 2019).

    Args:
        projections: random directions v per example.
        distribution: ``rademacher`` or ``gaussian`` directions (both have E[v v^T] = I).
        variance_reduction: SSM-VR: use 1/2 ||s||^2 instead of 1/2 (v^T s)^2 (eq. 8).
        time: process time the data are noised to and the score is taken at (default t_min).
    """

    def __init__(
        self,
        projections: Annotated[int, Field(ge=1, le=1024)] = 1,
        distribution: Literal["rademacher", "gaussian"] = "rademacher",
        variance_reduction: bool = False,
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
    ) -> None:
        self.projections = projections
        self.distribution = distribution
        self.variance_reduction = variance_reduction
        self.time = time

    def per_example(self, model: ScoreModel, x: Tensor, t: Tensor,
                    generator: torch.Generator | None = None,
                    labels: Tensor | None = None) -> Tensor:
        """The sliced objective per example, averaged over the projections; ``(B,)``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            s = model.score(x, t, labels)
            total = torch.zeros(x.shape[0], device=x.device, dtype=s.dtype)
            half_norm = 0.5 * s.flatten(1).pow(2).sum(1) if self.variance_reduction else None
            for _ in range(self.projections):
                v = probe_vectors(tuple(x.shape), self.distribution, device=x.device,
                                  dtype=x.dtype, generator=generator)
                quadratic = jacobian_quadratic_form(s, x, v)
                if half_norm is None:
                    total = total + quadratic + 0.5 * (v * s).flatten(1).sum(1).pow(2)
                else:
                    total = total + quadratic + half_norm
            return total / self.projections

"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
Algorithm 2): a few-step model from a trained teacher.

The noise levels ``varsigma = sigma / alpha`` are discretised into ``N`` points ``t_1 = t_min <
... < t_N = 1`` (by default Karras et al. 2022's ``rho = 7`` spacing, as in the paper). Each
example draws ``n ~ U{1, ..., N-1}`` and ``z ~ N(0, I)``; with ``x_{n+1} = alpha x0 + sigma z``
at ``t_{n+1}`` and ``x_hat_n`` one step of the *teacher's* probability-flow ODE from ``t_{n+1}``
to ``t_n`` (Euler or Heun: :func:`~diffusers_kit.solvers.ode.probability_flow_step`), the loss is

    L = d( f_theta(x_{n+1}, t_{n+1}),  f_theta-(x_hat_n, t_n) ),        lambda(t_n) = 1

where ``f_theta`` is the student's data prediction (a consistency function: wrap its network in
``consistency_precond``) and ``theta-`` the *target* network, a stopped-
gradient exponential average of the student updated after every optimizer step,
``theta- <- mu theta- + (1 - mu) theta`` (initialised to the student). The distance ``d`` is

* ``l2``: ``||a - b||^2 / D`` (the squared Euclidean distance over the dimension ``D``);
* ``pseudo_huber``: ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)`` by default
  (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", sec. 3.3).

The student starts from the teacher's weights (``init: teacher``, as in Song et al. 2023) when
their networks have the same parameters. The teacher is a trained model named by reference (a
spec or a run folder: :class:`~diffusers_kit.references.TrainedModel`), so the distilling run's
training hash includes the teacher's. It must have been trained under the same process.

The objective uses the objective protocol's training hooks (:class:`~diffusers_kit.objectives.
base.Objective`): :meth:`prepare` loads the teacher and builds the target, :meth:`after_step`
updates the target, and :meth:`state_dict` puts the target into checkpoints (a resumed run
continues it exactly).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import sum_dims
from diffusers_kit.objectives.teacher import TeacherObjective
from diffusers_kit.references import TrainedModel
from diffusers_kit.solvers.grids import Spacing, reaches_pure_noise, sampling_times
from diffusers_kit.solvers.ode import probability_flow_step

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def consistency_distance(a: Tensor, b: Tensor, distance: str, c: float | None = None) -> Tensor:
    """``d(a, b)`` per example, ``(B,)``: ``l2`` is ``||a - b||^2 / D``; ``pseudo_huber`` is
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)`` unless given (Song & Dhariwal
    2023, sec. 3.3)."""
    squared = sum_dims((a - b).pow(2))
    dim = a[0].numel()
    if distance == "l2":
        return squared / dim
    if distance == "pseudo_huber":
        c = 0.00054 * math.sqrt(dim) if c is None else c
        return (squared + c * c).sqrt() - c
    raise ValueError(f"distance must be l2 or pseudo_huber, got {distance!r}")


def discretisation(process: NoiseProcess, points: int, spacing: Spacing, rho: float
                   ) -> Tensor:
    """The ``N`` increasing times ``t_1 = t_min < ... < t_N = 1`` (float64) of the noise-level
    discretisation: the sampling grid of ``spacing`` (:func:`~diffusers_kit.solvers.grids.
    sampling_times`; ``edm`` is Song et al. 2023's ``rho`` spacing), reversed."""
    return sampling_times(process, points, spacing, rho)[:-1].flip(0)


class ConsistencyDistillation(TeacherObjective):
    """Consistency distillation (Song et al. 2023, Algorithm 2; see the module doc).

    Args:
        teacher: the trained diffusion model (a spec file or a run folder) whose
            probability-flow ODE is distilled; trained under the same process.
        points: ``N``, the number of noise levels of the discretisation (Song et al. 2023:
            18 on CIFAR-10, 40 on ImageNet 64).
        solver: the teacher's ODE step between adjacent levels, ``heun`` (the paper's) or
            ``euler``.
        mu: the target network's EMA decay (0.95 in Song et al. 2023's CD runs; 0: the target
            is the student, stopped).
        distance: ``l2`` or ``pseudo_huber``.
        huber_c: the pseudo-Huber ``c`` (default ``0.00054 sqrt(D)``).
        spacing: the discretisation's spacing (``edm``: ``rho`` spacing of the noise levels).
        rho: its exponent (7).
        init: ``teacher``: the student starts from the teacher's weights; ``none``: from its
            own initialisation.
    """

    ddp_ready = True  # one forward through the model, one ordinary backward
    objective_name = "consistency_distillation"
    student_hint = "the same network section, wrapped in consistency_precond"

    def __init__(
        self,
        teacher: TrainedModel,
        points: Annotated[int, Field(ge=2, le=100_000)] = 18,
        solver: Literal["heun", "euler"] = "heun",
        mu: Annotated[float, Field(ge=0, lt=1)] = 0.95,
        distance: Literal["l2", "pseudo_huber"] = "l2",
        huber_c: Annotated[float, Field(gt=0, le=1e6)] | None = None,
        spacing: Spacing = "edm",
        rho: Annotated[float, Field(gt=0, le=100)] = 7.0,
        init: Literal["teacher", "none"] = "teacher",
    ) -> None:
        self.teacher = teacher
        self.points, self.solver, self.mu = int(points), solver, float(mu)
        self.distance, self.huber_c = distance, huber_c
        self.spacing, self.rho, self.init = spacing, float(rho), init
        self._teacher: ScoreModel | None = None
        self._target: ScoreModel | None = None
        self._student: int | None = None  # id of the network prepare() set up

    # -- validation -------------------------------------------------------------------------
    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if reason := super().check(process, network):
            return reason
        if network.learned_variance:
            return "a network without learned_variance (a consistency model predicts x0)"
        if not getattr(network, "consistency_boundary", False):
            return ("a student that is a consistency function, f(x, t_min) = x / alpha exactly: "
                    "wrap its network in network kind consistency_precond (a network class "
                    "that satisfies the boundary itself sets consistency_boundary = True)")
        if reaches_pure_noise(process):
            return ("a process with alpha > 0 on the whole path (the teacher's ODE step and "
                    "the consistency function work in x / alpha)")
        if self.teacher.resolved:
            return self.teacher_mismatch(process)
        return None  # a reference not built yet (dkit validate) is checked in prepare()

    # -- the training hooks -----------------------------------------------------------------
    def prepare(self, model: ScoreModel) -> None:
        """Load the teacher (its sampling weights, frozen, on the student's device), start the
        student from its weights (``init: teacher``) and copy the student into the target. A
        second call for the same network (a second ``fit`` that continues) keeps both."""
        if self._target is not None and self._student == id(model.network):
            return
        self._teacher = self.load_teacher(model)
        target = copy.deepcopy(model.network).requires_grad_(False)
        self._target = type(model)(model.process, target).eval()
        self._student = id(model.network)

    @torch.no_grad()
    def after_step(self, model: ScoreModel, step: int) -> None:
        """``theta- <- mu theta- + (1 - mu) theta`` (buffers copied)."""
        target = self._ready()[1].network
        torch._foreach_lerp_(list(target.parameters()),
                             [p.detach() for p in model.network.parameters()], 1.0 - self.mu)
        for mine, theirs in zip(target.buffers(), model.network.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Tensor]:
        if self._target is None:
            return {}
        return {f"target.{k}": v for k, v in self._target.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        target = {k.removeprefix("target."): v for k, v in state.items()
                  if k.startswith("target.")}
        if target:
            self._ready()[1].network.load_state_dict(target)

    def _ready(self) -> tuple[ScoreModel, ScoreModel]:
        if self._teacher is None or self._target is None:
            raise RuntimeError("consistency_distillation.prepare(model) has not run (the "
                               "trainer calls it before the first step)")
        return self._teacher, self._target

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
             labels: Tensor | None = None) -> Tensor:
        return self.per_example(model, x0, generator, labels).mean()

    def per_example(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
                    labels: Tensor | None = None) -> Tensor:
        """``d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x_hat_n, t_n))`` per example, ``(B,)``."""
        teacher, target = self._ready()
        times = discretisation(model.process, self.points, self.spacing, self.rho).to(x0.device)
        n = torch.randint(0, len(times) - 1, (x0.shape[0],), device=x0.device,
                          generator=generator)
        t_next, t_now = times[n + 1], times[n]
        z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_next, _ = model.process.marginal_sample(x0, t_next.to(x0.dtype), z)
        with torch.no_grad():
            x_now = probability_flow_step(teacher, x_next, t_next, t_now, self.solver, labels)
            aim = target.predict(x_now, t_now.to(x0.dtype), "x0", labels)
        out = model.predict(x_next, t_next.to(x0.dtype), "x0", labels)
        return consistency_distance(out, aim, self.distance, self.huber_c)


__all__ = ["ConsistencyDistillation", "consistency_distance", "discretisation"]

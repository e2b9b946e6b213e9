"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR, Algorithm 2): a student that takes in one deterministic DDIM step
what its teacher takes in two.

**The grids.** The student's ``K`` steps are those of a ``K``-step DDIM sampler
(:func:`~diffusers_kit.solvers.grids.sampling_times` with the objective's ``spacing``): times
``t_0 = 1 > t_1 > ... > t_{K-1} = t_min`` and ``t_K = 0``, so that ``{kind: ddim, steps: K,
spacing: <the same>}`` samples the student on exactly the steps it was trained on (the last
move lands on the clean end ``sigma = 0``, as the sampler's does: :mod:`~diffusers_kit.solvers.
tables`). The teacher
steps on the grid refined by the midpoints ``t'_i = (t_i + t_{i+1}) / 2`` (on the uniform grid
the paper's ``t' = t - 0.5 / N``): a ``2K``-step teacher.

**The target** (Algorithm 2). Per example ``i ~ U{0, ..., K-1}``, ``eps ~ N(0, I)``,
``z_t = alpha_t x0 + sigma_t eps`` at ``t = t_i``, ``t'`` the midpoint, ``t'' = t_{i+1}``; with
the teacher's data prediction ``x_hat`` and the deterministic DDIM step (Song et al. 2021,
eq. 12 with ``eta = 0``)

    z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat),

two teacher steps give ``z' `` at ``t'`` and ``z''`` at ``t''``, and the student's target is the
data prediction with which *one* such step from ``t`` lands on ``z''``:

    x_tilde = (z'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).

(The denominator is positive: the signal-to-noise ratio falls with ``t``.) The loss is
``w(t) ||x_tilde - x_hat_student(z_t, t)||^2 / D`` with the paper's "truncated SNR" weight
``w = max(SNR, 1)`` (``truncated_snr``, sec. 4) or ``w = SNR + 1`` (``snr_plus_one``, which is
the v-prediction loss ``||v_tilde - v_hat||^2``), ``SNR = alpha_t^2 / sigma_t^2``.

One run is one halving: the student of a ``K``-step phase is the teacher of the ``K / 2``-step
phase after it (a spec whose ``teacher`` names the previous spec). The student starts from the
teacher's weights (``init: teacher``, as in the paper). The teacher is loaded through
:class:`~diffusers_kit.objectives.teacher.TeacherObjective` (a model reference, in the
training hash; trained under the student's process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import mean_dims
from diffusers_kit.objectives.teacher import TeacherObjective
from diffusers_kit.processes.base import expand
from diffusers_kit.references import TrainedModel
from diffusers_kit.solvers.grids import Spacing, sampling_times

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def ddim_move(z: Tensor, x_hat: Tensor, here: tuple[Tensor, Tensor],
              there: tuple[Tensor, Tensor]) -> Tensor:
    """The deterministic DDIM step ``z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t
    x_hat)`` from ``here = (alpha_t, sigma_t)`` to ``there = (alpha_s, sigma_s)`` (each
    ``(B,)``)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = here, there
    ratio = expand(sigma_s / sigma_t, z)
    return expand(alpha_s, z) * x_hat + ratio * (z - expand(alpha_t, z) * x_hat)


def student_grid(process: NoiseProcess, steps: int, spacing: Spacing) -> Tensor:
    """``t_0 = 1 > ... > t_{K-1} = t_min > t_K = 0``: a ``K``-step DDIM sampler's times
    (float64, ``K + 1`` of them; a discrete process may merge a few at large ``K``)."""
    return sampling_times(process, steps, spacing)


def two_step_target(teacher: ScoreModel, z_t: Tensor, t: Tensor, t_mid: Tensor,
                    t_next: Tensor, labels: Tensor | None = None) -> Tensor:
    """``x_tilde``: the data prediction with which one DDIM step from ``t`` lands where two of
    the teacher's land, through ``t_mid`` to ``t_next`` (the module doc; each time ``(B,)``)."""
    process = teacher.process
    here, middle, there = (process.marginal(s.to(z_t.dtype)) for s in (t, t_mid, t_next))
    there = (there[0], torch.where(t_next == 0, 0.0, there[1]))  # t = 0: the clean end
    x_hat = teacher.predict(z_t, t.to(z_t.dtype), "x0", labels)
    z_mid = ddim_move(z_t, x_hat, here, middle)
    x_mid = teacher.predict(z_mid, t_mid.to(z_t.dtype), "x0", labels)
    z_next = ddim_move(z_mid, x_mid, middle, there)
    ratio = there[1] / here[1]
    return (z_next - expand(ratio, z_t) * z_t) / expand(there[0] - ratio * here[0], z_t)


class ProgressiveDistillation(TeacherObjective):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2; see the module doc): one
    phase, a ``2 * steps`` teacher into a ``steps`` student.

    Args:
        teacher: the trained model (a spec file or a run folder) whose two DDIM steps the
            student learns to take in one; trained under the same process.
        steps: ``K``, the student's DDIM steps (the teacher takes ``2K``).
        spacing: the student's DDIM grid (sample it with ``{kind: ddim, steps: K, spacing:
            <this>}``).
        weighting: ``truncated_snr`` (``max(SNR, 1)``, the paper's) or ``snr_plus_one``
            (``SNR + 1``: the v-prediction loss).
        init: ``teacher``: the student starts from the teacher's weights; ``none``: from its
            own initialisation.
    """

    ddp_ready = True  # one forward through the model, one ordinary backward
    objective_name = "progressive_distillation"

    def __init__(
        self,
        teacher: TrainedModel,
        steps: Annotated[int, Field(ge=1, le=100_000)] = 4,
        spacing: Spacing = "uniform",
        weighting: Literal["truncated_snr", "snr_plus_one"] = "truncated_snr",
        init: Literal["teacher", "none"] = "teacher",
    ) -> None:
        self.teacher = teacher
        self.steps, self.spacing = int(steps), spacing
        self.weighting, self.init = weighting, init
        self._teacher: ScoreModel | None = None
        self._student: int | None = None

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if reason := super().check(process, network):
            return reason
        if network.learned_variance:
            return "a network without learned_variance (the student predicts x0 for DDIM)"
        if self.teacher.resolved:
            return self.teacher_mismatch(process)
        return None  # a reference not built yet (dkit validate) is checked in prepare()

    def prepare(self, model: ScoreModel) -> None:
        """Load the teacher and start the student from its weights (``init: teacher``); a
        second call for the same network keeps both."""
        if self._teacher is not None and self._student == id(model.network):
            return
        self._teacher = self.load_teacher(model)
        self._student = id(model.network)

    def weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``max(SNR, 1)`` or ``SNR + 1`` with ``SNR = alpha^2 / sigma^2``."""
        snr = (alpha / sigma) ** 2
        return snr.clamp(min=1.0) if self.weighting == "truncated_snr" else snr + 1.0

    def loss(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
             labels: Tensor | None = None) -> Tensor:
        return self.per_example(model, x0, generator, labels).mean()

    def per_example(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
                    labels: Tensor | None = None) -> Tensor:
        """``w(t) ||x_tilde - x_hat_student(z_t, t)||^2 / D`` per example, ``(B,)``."""
        if self._teacher is None:
            raise RuntimeError("progressive_distillation.prepare(model) has not run (the "
                               "trainer calls it before the first step)")
        grid = student_grid(model.process, self.steps, self.spacing).to(x0.device)
        i = torch.randint(0, len(grid) - 1, (x0.shape[0],), device=x0.device,
                          generator=generator)
        t, t_next = grid[i], grid[i + 1]
        z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        z_t, _ = model.process.marginal_sample(x0, t.to(x0.dtype), z)
        with torch.no_grad():
            aim = two_step_target(self._teacher, z_t, t, (t + t_next) / 2, t_next, labels)
        out = model.predict(z_t, t.to(x0.dtype), "x0", labels)
        alpha, sigma = model.process.marginal(t.to(x0.dtype))
        return self.weight(alpha, sigma) * mean_dims((out - aim).pow(2))


__all__ = ["ProgressiveDistillation", "ddim_move", "student_grid", "two_step_target"]

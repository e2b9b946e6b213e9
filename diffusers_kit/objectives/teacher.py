"""What the distillation objectives share: a trained teacher model, named by reference, loaded
frozen on the student's device before the first step, checked to run the student's process, and
(``init: teacher``) its weights copied into the student.

The teacher is a :class:`~diffusers_kit.references.TrainedModel` (a spec file or a run folder),
so the distilling run's training hash includes the teacher's. The objective protocol's
``prepare`` hook (:class:`~diffusers_kit.objectives.base.Objective`) is where a subclass calls
:meth:`TeacherObjective.load_teacher`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.objectives.base import Objective
from diffusers_kit.references import TrainedModel

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

#: the times at which the teacher's and the student's processes must agree
PROCESS_CHECK_TIMES = (0.0, 0.05, 0.3, 0.6, 0.95, 1.0)


class TeacherObjective(Objective):
    """Base of objectives that distil a trained ``teacher`` into the model being trained.

    Subclasses set :attr:`objective_name` (their registered name, for messages) and
    :attr:`student_hint` (how a student gets the teacher's parameters), keep ``self.teacher``
    (the reference) and ``self.init`` (``teacher`` or ``none``), and call
    :meth:`load_teacher` in ``prepare``.
    """

    objective_name = "distillation"
    student_hint = "the same network section"
    teacher: TrainedModel
    init: str

    def teacher_mismatch(self, process: NoiseProcess) -> str | None:
        """Why the teacher cannot teach a student on ``process`` (its process differs), or
        None. Compares ``(alpha, sigma)`` at :data:`PROCESS_CHECK_TIMES`."""
        own = self.teacher.diffusion().process
        times = torch.tensor(PROCESS_CHECK_TIMES, dtype=torch.float64)
        for mine, theirs in zip(process.marginal(times), own.marginal(times), strict=True):
            if not torch.allclose(mine, theirs.double(), rtol=1e-6, atol=1e-9):
                return (f"a teacher trained under the same process as the student "
                        f"({self.teacher.ref.describe()} uses {own!r}, the student "
                        f"{process!r})")
        return None

    def load_teacher(self, model: ScoreModel) -> ScoreModel:
        """The teacher (its sampling weights, frozen, in eval mode, on the student's device)
        bound to the student's process; with ``init: teacher`` the student's weights become
        the teacher's."""
        if (reason := self.teacher_mismatch(model.process)) is not None:
            raise ValueError(f"objective {self.objective_name} needs {reason}")
        device = next(iter(model.parameters()), torch.empty(0)).device
        teacher_network = self.teacher.network().to(device)
        teacher_network.requires_grad_(False)
        bind = type(model)  # a ScoreModel (components do not import the model layer)
        teacher = bind(model.process, teacher_network).eval()
        if self.init == "teacher":
            student = model.network
            theirs = teacher_network.state_dict()
            mine = student.state_dict()
            if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
                raise ValueError(
                    f"objective {self.objective_name} with init: teacher needs a student "
                    f"network with the teacher's parameters ({self.student_hint}); set init: "
                    "none to train it from its own initialisation")
            student.load_state_dict(theirs)
        return teacher


__all__ = ["PROCESS_CHECK_TIMES", "TeacherObjective"]

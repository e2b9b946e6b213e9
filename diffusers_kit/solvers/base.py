"""Samplers and solvers (kind ``solver``): the base class, the result and what they share.

Every sampler counts its network evaluations (``model.nfe`` is a host integer, so counting needs
no device synchronisation), and records the trajectory ``x_t`` and / or the predictions
``x0_hat(x_t)`` at a few evenly spaced steps only when asked (``keep_trajectory``, ``keep_x0``):
when neither is set nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Progress = Callable[[int], None]


@dataclass
class SampleResult:
    """Samples plus what the sampler measured.

    ``nfe``: network evaluations; ``trajectory``: ``x`` at the recorded steps;
    ``x0_predictions``: the denoised estimates ``x0_hat`` at the same steps (a progressive-
    generation figure, Ho et al. 2020, fig. 6); ``times``: the process time of each record.
    """

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] = field(default_factory=list)
    x0_predictions: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a parameter-free model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class Recorder:
    """Keeps ``x`` and / or ``x0_hat`` at ``snapshots`` evenly spaced steps out of ``steps``.

    The steps to record are chosen once, on the host; :meth:`wants` is a set lookup, so a loop
    that asks for nothing pays nothing and stores nothing.
    """

    def __init__(
        self, steps: int, *, trajectory: bool, x0: bool, snapshots: int, times: list[float]
    ) -> None:
        self.trajectory: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.times: list[float] = []
        self.keep_trajectory, self.keep_x0 = trajectory, x0
        self._times = times
        self.marks: set[int] = set()
        if (trajectory or x0) and steps > 0:
            count = max(1, min(snapshots, steps))
            self.marks = {round(k * (steps - 1) / max(count - 1, 1)) for k in range(count)}

    def wants(self, step: int) -> bool:
        return step in self.marks

    def record(self, step: int, x: torch.Tensor, x0: torch.Tensor | None = None) -> None:
        if step not in self.marks:
            return
        if self.keep_trajectory:
            self.trajectory.append(x.detach().clone())
        if self.keep_x0 and x0 is not None:
            self.x0.append(x0.detach().clone())
        self.times.append(self._times[step] if step < len(self._times) else float("nan"))

    def result(self, samples: torch.Tensor, nfe: int) -> SampleResult:
        return SampleResult(samples, nfe, self.trajectory, self.x0, self.times)


class Solver:
    """Base class of samplers: draw ``shape`` samples from a trained :class:`ScoreModel`.

    ``progress(k)`` is called as work advances; ``total_steps`` says how many units there are.
    """

    def check(self, process: NoiseProcess) -> str | None:
        """Return why this solver cannot sample ``process``, or ``None`` if it can."""
        return None

    def total_steps(self, process: NoiseProcess) -> int:
        return 1

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> SampleResult:
        raise NotImplementedError

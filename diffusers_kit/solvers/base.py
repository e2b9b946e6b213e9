"""Samplers and solvers (kind ``solver``)."""

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
    """Samples plus what the sampler measured (network evaluations, optional trajectory)."""

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] = field(default_factory=list)


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

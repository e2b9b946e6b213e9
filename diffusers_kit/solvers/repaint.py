"""RePaint's resampling (Lugmayr et al. 2022, alg. 1 and sec. 4.2): ancestral sampling that
goes back in time to harmonise a conditioned region with the rest.

The descent is DDPM ancestral sampling (Ho et al. 2020, alg. 2; :mod:`diffusers_kit.solvers.
ancestral`) on the process's steps or a sub-sequence. Every ``jump_length`` steps, the state
jumps back up those steps through the process's **forward** kernel, one exact transition
``q(x_t | x_s) = N(a x_s, b^2 I)`` per step (:meth:`NoiseProcess.transition`), and descends
again; each block is traversed ``resampling`` times in all. The network sees every re-noised
state, so information flows between the measured and the generated parts of the image.

The conditioning itself is not here: RePaint's "known region from ``q(x_{t-1} | y)``" is the
``replacement`` guidance term (:class:`diffusers_kit.guidance.Replacement`), which puts ``y``
into ``x0_hat`` so that each ancestral step draws the known part from the bridge
``q(x_s | x_t, x_0 = y)``. ``restore: {method: {kind: replacement, ...}, solver: {kind:
repaint}}`` is RePaint; with any other term the jumps resample that term's posterior.
``resampling: 1`` is plain ancestral sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.solvers.ancestral import PosteriorGrid, posterior_grid, posterior_step
from diffusers_kit.solvers.base import Callback, ClipX0, Solver, Steps, options
from diffusers_kit.solvers.grids import Spacing
from diffusers_kit.solvers.noise import Noise

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor


def jump_schedule(steps: int, jump_length: int, resampling: int) -> list[tuple[str, int]]:
    """The moves: ``("down", i)`` is the step ``times[i] -> times[i + 1]``, ``("up", i)`` its
    forward re-noising ``times[i + 1] -> times[i]``. Blocks of ``jump_length`` steps, each
    descended ``resampling`` times with a jump back up between descents."""
    moves: list[tuple[str, int]] = []
    for begin in range(0, steps, jump_length):
        block = range(begin, min(begin + jump_length, steps))
        for round_ in range(resampling):
            moves += [("down", i) for i in block]
            if round_ < resampling - 1:
                moves += [("up", i) for i in reversed(block)]
    return moves


@options
class RePaint(Solver):
    """Ancestral sampling with RePaint's jumps back in time (Lugmayr et al. 2022).

    Args:
        steps: descent steps (default: 250 of a discrete process's, as RePaint used; 250
            otherwise). Network evaluations: ``steps * resampling``.
        jump_length: steps per jump (RePaint: 10).
        resampling: descents per block (RePaint: 10; 1 is plain ancestral sampling).
        spacing: how the times are spaced.
    """

    steps: Steps = 250
    jump_length: Annotated[int, Field(ge=1, le=10_000)] = 10
    resampling: Annotated[int, Field(ge=1, le=100)] = 10
    spacing: Spacing = "uniform"
    clip_x0: ClipX0 = None

    def grid(self, process: NoiseProcess) -> PosteriorGrid:
        return posterior_grid(process, self.steps, self.spacing)

    def total_steps(self, process: NoiseProcess) -> int:
        moves = jump_schedule(self.cached_grid(process).table.steps, self.jump_length,
                              self.resampling)
        return sum(1 for kind, _ in moves if kind == "down")

    def run(self, model: ScoreModel, x: Tensor, grid: PosteriorGrid, noise: Noise,
            callback: Callback) -> Tensor:
        """Ancestral steps down (:func:`~diffusers_kit.solvers.ancestral.posterior_step`, each
        reported: a step recorded again keeps its last descent), exact forward transitions
        up; the very last step returns its mean."""
        rows, steps = grid.table.rows, grid.table.steps
        times = grid.table.vectors(x.shape[0], x)
        moves = jump_schedule(steps, self.jump_length, self.resampling)
        for n, (kind, i) in enumerate(moves):
            if kind == "up":  # x_t ~ q(x_t | x_s): the forward kernel, exact
                x = torch.add(x * rows["a"][i], noise.randn_like(x), alpha=rows["b2"][i] ** 0.5)
            else:
                final = i == steps - 1 and n == len(moves) - 1
                x = posterior_step(self, model, x, grid, i, times[i], None if final else noise,
                                   callback)
        return x


__all__ = ["RePaint", "jump_schedule"]

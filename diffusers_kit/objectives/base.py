"""Training objectives (kind ``objective``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


class Objective:
    """Base class of objectives: ``loss(model, x0, generator)`` returns a scalar tensor."""

    def loss(
        self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

"""Networks (kind ``network``): ``forward(x_t, t) -> prediction`` of one parameterisation."""

from __future__ import annotations

import torch

from diffusers_kit.processes.base import PREDICTIONS


class Network(torch.nn.Module):
    """Base class of networks.

    ``prediction`` names what the output means (one of ``eps``, ``score``, ``x0``, ``v``);
    :class:`diffusers_kit.model.ScoreModel` converts it to whatever a solver or objective needs.
    ``data_shape`` is supplied by the run graph from the data set (``dkit_context``).
    """

    dkit_context = ("data_shape",)
    prediction: str = "eps"

    def __init__(self, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

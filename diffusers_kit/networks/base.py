"""Networks (kind ``network``): ``forward(x_t, t[, y]) -> prediction`` of one parameterisation."""

from __future__ import annotations

import torch

from diffusers_kit.processes.base import PREDICTIONS


class Network(torch.nn.Module):
    """Base class of networks.

    ``prediction`` names what the output means (one of ``eps``, ``score``, ``x0``, ``v``, ``mu``,
    ``velocity``);
    :class:`diffusers_kit.model.ScoreModel` converts it to whatever a solver or objective needs.
    ``data_shape`` is supplied by the run graph from the data set (``dkit_context``).

    ``learned_variance``: the output has twice the data's channels (dimension 1): the prediction,
    then ``v`` in [-1, 1] that interpolates the reverse-step log-variance between
    ``log beta~_t`` and ``log beta_t`` (Nichol & Dhariwal 2021, eq. 15).
    ``num_classes``: the network is class-conditional; label ``num_classes`` is the null class
    (no label), which is what ``y=None`` means. ``class_dropout``: how often the label was
    replaced by the null class in training; only above 0 does the null class give the
    unconditional prediction (what classifier-free guidance needs).
    """

    dkit_context = ("data_shape",)
    prediction: str = "eps"
    learned_variance: bool = False
    num_classes: int | None = None
    class_dropout: float = 0.0

    def __init__(self, prediction: str = "eps", learned_variance: bool = False) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """One line for logs and the console: the class and its parameter count."""
        return f"{type(self).__name__} with {self.parameter_count():,} parameters"


def check_data_shape(name: str, data_shape: tuple[int, ...], rank: int, what: str) -> None:
    """A clear ValueError (a spec error in the run graph) when the data does not fit."""
    if len(data_shape) != rank or any(int(s) < 1 for s in data_shape):
        raise ValueError(f"{name} needs {what}; this data set's examples have shape "
                         f"{tuple(data_shape)}")

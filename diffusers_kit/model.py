"""A network bound to a noise process: the score / eps / x0 views solvers and objectives use."""

from __future__ import annotations

import torch

from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import NoiseProcess


class ScoreModel(torch.nn.Module):
    """``network`` interpreted through ``process``.

    The network predicts ``network.prediction``; :meth:`predict` converts it (through
    :meth:`NoiseProcess.convert`) so that callers never care which parameterisation was trained.
    A network with ``learned_variance`` outputs twice the data's channels (dimension 1): the
    prediction, then the variance output ``v``; :meth:`split` separates them and the conversions
    use the prediction only. ``y`` (class labels) is passed to class-conditional networks only.
    ``nfe`` counts network evaluations (a host integer: counting needs no device sync).
    """

    def __init__(self, process: NoiseProcess, network: Network) -> None:
        super().__init__()
        self.process = process
        self.network = network
        self.nfe = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Raw network output at ``(x_t, t)`` (both halves for a learned-variance network)."""
        self.nfe += 1
        if y is not None or getattr(self.network, "num_classes", None) is not None:
            return self.network(x, t.to(x.dtype), y)
        return self.network(x, t.to(x.dtype))

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prediction, v)``: ``v`` is None unless the network learns its variance."""
        if self.network.learned_variance:
            prediction, v = output.chunk(2, dim=1)
            return prediction, v
        return output, None

    def convert(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, target: str
                ) -> torch.Tensor:
        """The network's ``prediction`` half converted to ``target``."""
        return self.process.convert(prediction, x, t.to(x.dtype), self.network.prediction, target)

    def predict(self, x: torch.Tensor, t: torch.Tensor, target: str,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction converted to ``target`` (``eps``, ``score``, ``x0``, ``v``)."""
        prediction, _ = self.split(self(x, t, y))
        return self.convert(prediction, x, t, target)

    def score(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
              ) -> torch.Tensor:
        """``s_theta(x_t, t) ~ grad log q_t(x_t)``."""
        return self.predict(x, t, "score", y)

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
            ) -> torch.Tensor:
        return self.predict(x, t, "eps", y)

"""A network bound to a noise process: the score / eps / x0 views solvers and objectives use."""

from __future__ import annotations

import torch

from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import NoiseProcess


class ScoreModel(torch.nn.Module):
    """``network`` interpreted through ``process``.

    The network predicts ``network.prediction``; :meth:`predict` converts it (through
    :meth:`NoiseProcess.convert`) so that callers never care which parameterisation was trained.
    ``nfe`` counts network evaluations (a host integer: counting needs no device sync).
    """

    def __init__(self, process: NoiseProcess, network: Network) -> None:
        super().__init__()
        self.process = process
        self.network = network
        self.nfe = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output at ``(x_t, t)``."""
        self.nfe += 1
        return self.network(x, t.to(x.dtype))

    def predict(self, x: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
        """The network's prediction converted to ``target`` (``eps``, ``score``, ``x0``, ``v``)."""
        output = self(x, t)
        return self.process.convert(output, x, t.to(x.dtype), self.network.prediction, target)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``s_theta(x_t, t) ~ grad log q_t(x_t)``."""
        return self.predict(x, t, "score")

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x, t, "eps")

"""Training objectives (kind ``objective``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess


class Objective:
    """Base class of objectives: ``loss(model, x0, generator, labels)`` returns a scalar tensor.

    ``check(process, network)`` returns why the pair cannot be trained with this objective (the
    run graph reports it as a spec error before anything runs), or None.
    ``labels`` are class labels for class-conditional networks (None otherwise); an objective
    with ``needs_labels`` always gets them (the data set must have some). ``first_stage``: the
    objective trains an autoencoder of a spec's ``autoencoder`` section (its ``model.process``
    is None); every other objective trains a diffusion network.
    """

    needs_labels: bool = False
    first_stage: bool = False  # trains an autoencoder (no process; reconstruction)
    differentiates_twice: bool = False  # grads of grads (torch.compile cannot do that)

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if network.prediction == "logits":
            return ("a denoising network: a classifier network is trained with objective "
                    "kind: classification")
        return None

    def loss(self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def sum_dims(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.flatten(1).sum(1)


def mean_dims(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.flatten(1).mean(1)

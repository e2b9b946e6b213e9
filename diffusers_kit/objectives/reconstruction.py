"""Training a first stage: the autoencoder's own loss (kind ``objective``, ``reconstruction``).

An autoencoder for latent diffusion (Rombach et al. 2022, sec. 3.1) is trained like any other
network, by the shared engine — optimizer, EMA, gradient clipping, checkpoints, resume, data
parallel — through this objective, which only hands the batch to the autoencoder: the loss is
the family's own (:meth:`Autoencoder.loss`), e.g. ``mean rho(x - D(z)) + beta KL / D`` for
the KL autoencoder (Kingma & Welling 2014) or reconstruction + codebook + commitment for the VQ
one (van den Oord et al. 2017). There is no noise process: the model's ``process`` is None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.objectives.base import Objective

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess


class Reconstruction(Objective):
    """Trains an autoencoder (a first stage) by its own loss: reconstruction + regulariser.

    The loss is ``model.network.loss(x0, generator)``; the autoencoder is a spec's
    ``autoencoder`` section, trained by the shared engine (EMA, checkpoints, resume).
    """

    first_stage = True

    def check(self, process: NoiseProcess | None, network: Network) -> str | None:
        if not isinstance(network, Autoencoder):
            return ("an autoencoder (a spec's 'autoencoder' section, e.g. kind: kl) to train by "
                    "reconstruction; a diffusion network is trained by a denoising objective")
        return None

    def loss(self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        network = model.network
        if not isinstance(network, Autoencoder):
            raise TypeError(f"reconstruction trains an autoencoder, not a "
                            f"{type(network).__name__}")
        return network.loss(x0, generator)


__all__ = ["Reconstruction"]

"""Latent diffusion as composition (Rombach, Blattmann, Lorenz, Esser & Ommer 2022).

Two stages. The first, an autoencoder ``E, D`` (kind ``autoencoder``; trained by its own spec
with the objective ``reconstruction``), maps an image ``x`` of shape ``(C, H, W)`` to a latent
of shape ``(c, H/f, W/f)``; its scale factor ``lambda = 1 / std(E(x))`` over the training set is
stored in its checkpoint and applied inside :meth:`Autoencoder.encode` /
:meth:`Autoencoder.decode`, so the diffusion sees ``z_0 = lambda E(x)`` with unit variance and
the pictures are ``D(z_0 / lambda)``. The second stage is *any* process, network, objective,
solver and guidance term, unchanged, on ``z``::

    x --E, x lambda--> z_0 --q(z_t | z_0)--> z_t ... sampler ... z_0 --/ lambda, D--> x

What this module provides, and the one place each idea lives:

- :class:`LatentCache`: the training and held-out images encoded **once** (the posterior mean,
  batched, without gradients) and reused by every step of training and by the metrics of the
  model alone (a latent likelihood), keyed by the image tensors it was computed from;
- :func:`decode`: latents to images in batches (samples, trajectories, x0 predictions);
- :class:`DecodedOperator`: a forward model composed with the decoder, ``A(D(z / lambda))``,
  so that DPS (which needs only ``A`` and autograd) restores with a latent model; the methods
  that need an SVD (replacement, pigdm) are refused, because the decoder is not linear.

Metrics of the samples judge decoded images against the pixel data. Metrics of the model
alone (a likelihood) can only judge it where it lives: they see the encoded data, and their
figures are named ``latent_...`` — a latent bits/dim is not a pixel bits/dim (it omits the
decoder's own likelihood), and is never reported as one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.forward_models.base import ForwardModel

if TYPE_CHECKING:
    from diffusers_kit.autoencoders.base import Autoencoder

BATCH = 256
"""Images encoded or decoded at once."""

LATENT_PREFIX = "latent_"
"""Prefix of the figures a metric of the model alone computes in latent space."""


@torch.no_grad()
def in_batches(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               autoencoder: Autoencoder, empty_shape: tuple[int, ...],
               batch_size: int = BATCH) -> torch.Tensor:
    """``function`` (an autoencoder's map) on ``x`` in batches, each moved to the autoencoder's
    device as float32, the result returned on ``x``'s device; ``(0, *empty_shape)`` for no
    input."""
    device = autoencoder.scale.device
    parts = [function(x[i:i + batch_size].to(device, torch.float32))
             for i in range(0, len(x), batch_size)]
    if not parts:
        return x.new_zeros((0, *empty_shape))
    return torch.cat(parts).to(x.device)


def encode(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = BATCH
           ) -> torch.Tensor:
    """``lambda E(x)`` (posterior means) for ``images``, in batches, on the autoencoder's device,
    returned on the images' device."""
    return in_batches(autoencoder.encode, images, autoencoder, tuple(autoencoder.latent_shape),
                      batch_size)


def decode(autoencoder: Autoencoder, latents: torch.Tensor, batch_size: int = BATCH
           ) -> torch.Tensor:
    """``D(z / lambda)`` for diffusion latents ``z``, in batches, returned on ``z``'s device."""
    return in_batches(autoencoder.decode, latents, autoencoder, tuple(autoencoder.data_shape),
                      batch_size)


class LatentCache:
    """Images encoded once: ``latents(images)`` returns the same tensor for the same images
    (the same tensor object, or one with equal shape and content) without encoding again."""

    def __init__(self, autoencoder: Autoencoder) -> None:
        self.autoencoder = autoencoder
        self._entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        for source, latents in self._entries:
            if source is images or (source.shape == images.shape
                                    and source.device == images.device
                                    and torch.equal(source, images)):
                return latents
        latents = encode(self.autoencoder, images)
        self._entries.append((images, latents))
        return latents

    def splits(self, data: DataSplits) -> DataSplits:
        """``data`` with its images encoded (labels kept)."""
        return DataSplits(train=self.latents(data.train), heldout=self.latents(data.heldout),
                          train_labels=data.train_labels, heldout_labels=data.heldout_labels)


class DecodedOperator(ForwardModel):
    """``y = A(D(z / lambda)) + sigma_y n``: a pixel-space forward model seen from the latent
    space through the decoder. Only ``A`` exists (the composition is not linear: no adjoint, no
    SVD, no pseudo-inverse), which is all DPS needs; its gradient flows through the decoder.
    The measurement noise is the pixel-space operator's own noise model."""

    linear = False

    def __init__(self, operator: ForwardModel, autoencoder: Autoencoder) -> None:
        super().__init__(operator.sigma_y, data_shape=tuple(autoencoder.latent_shape))
        self.noise = operator.noise
        self.operator = operator
        self.autoencoder = autoencoder
        self.measurement_shape = tuple(operator.measurement_shape)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator.A(self.autoencoder.decode(x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("A composed with a decoder is not linear: it has no adjoint "
                                  "(use dps, which needs only A)")


__all__ = ["LATENT_PREFIX", "DecodedOperator", "LatentCache", "decode", "encode", "in_batches"]

"""First stages of latent diffusion (kind ``autoencoder``; Rombach et al. 2022, sec. 3.1).

An autoencoder maps an image ``x`` of shape ``(C, H, W)`` to a latent ``z`` of shape
``(c, H/f, W/f)`` and back. Latent diffusion trains and samples any process / network /
objective / solver in that latent space (see :mod:`diffusers_kit.latent`); this module only
defines the protocol every first stage follows.

**The scale factor.** The diffusion's prior is N(0, I), so latents should have unit variance.
``scale`` (a buffer, saved in the checkpoint with the weights) is ``1 / std(z)`` estimated over
the training set by :meth:`Autoencoder.calibrate` at the end of the autoencoder's own run
(Rombach et al. 2022, appendix G: "rescale the latent by the component-wise standard
deviation"). :meth:`encode` returns ``scale * z`` and :meth:`decode` divides by ``scale``: the
factor is applied here, always, so no caller can forget it.
"""

from __future__ import annotations

import torch

from diffusers_kit.networks.base import Network


class Autoencoder(Network):
    """Base class of first stages: an encoder, a decoder and their training loss.

    Subclasses implement :meth:`encode_unscaled`, :meth:`decode_unscaled` and :meth:`loss`,
    and set ``latent_shape`` in their constructor. It is a :class:`Network` (prediction
    ``reconstruction``) so that the training engine — EMA, checkpoints, resume, data parallel —
    trains it unchanged, through the objective ``reconstruction`` which calls :meth:`loss`.

    ``data_shape`` (the images' shape) is supplied by the run graph (``dkit_context``).
    """

    prediction = "reconstruction"
    dkit_context = ("data_shape",)

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.learned_variance = False
        self.data_shape: tuple[int, ...] = ()
        self.latent_shape: tuple[int, ...] = ()
        self.register_buffer("scale", torch.ones(()))

    # -- what a family implements ----------------------------------------------------------
    def encode_unscaled(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """The latent of ``x`` before scaling: the posterior mean (``generator`` None) or a
        draw from the posterior (a KL autoencoder), the quantised code (a VQ one)."""
        raise NotImplementedError

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """The image of an unscaled latent ``z``."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scalar training loss on a batch of images ``x`` (reconstruction + the family's
        regulariser), using ``generator`` for any randomness."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``scale * z``: the latent the diffusion sees (unit variance over the training set
        once :meth:`calibrate` has run)."""
        return self.encode_unscaled(x, generator) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image of a diffusion latent ``z`` (``z / scale`` decoded)."""
        return self.decode_unscaled(z / self.scale)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` with the posterior mean (the scale cancels)."""
        return self.decode_unscaled(self.encode_unscaled(x))

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 256) -> float:
        """Set ``scale = 1 / std(z)`` over ``images`` (all elements of the unscaled posterior
        means, in batches) and return it."""
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(images), batch_size):
            z = self.encode_unscaled(images[start:start + batch_size].to(self.scale.device))
            z = z.double()
            total += float(z.sum())
            total_sq += float((z * z).sum())
            count += z.numel()
        if count == 0:
            raise ValueError("calibrating the latent scale needs at least one image")
        mean = total / count
        variance = max(total_sq / count - mean * mean, 1e-20)
        self.scale.fill_(variance ** -0.5)
        return float(self.scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))`` (``t`` is ignored)."""
        return self.reconstruct(x)

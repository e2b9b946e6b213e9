"""Vector-quantised autoencoder (VQ-VAE; van den Oord, Vinyals & Kavukcuoglu 2017; the "VQ-reg"
first stage of Rombach et al. 2022, sec. 3.1).

The encoder maps an image to ``z_e`` of shape ``(c, H/f, W/f)``; every latent pixel's
``c``-vector is replaced by its nearest codebook vector,

    z_q = e_k,   k = argmin_j || z_e - e_j ||^2   (over a codebook {e_1 .. e_K} of R^c),

and the decoder maps ``z_q`` back. The argmin has no gradient, so the decoder's input is
``z_e + sg[z_q - z_e]`` (the straight-through estimator: the value of ``z_q``, the gradient of
``z_e``; ``sg`` stops gradients). The loss over a batch (van den Oord et al., eq. 3) is

    L = mean(rho(x - D(z_q)))  +  mean(|| sg[z_e] - z_q ||^2)  +  beta mean(|| z_e - sg[z_q] ||^2)

(means over all elements): the reconstruction trains encoder and decoder, the codebook term
moves the codebook vectors towards the encoder outputs assigned to them, and the commitment
term (``beta``, 0.25 in the paper) keeps the encoder's outputs close to their codes.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.autoencoders import blocks as arch
from diffusers_kit.autoencoders.blocks import ConvAutoencoder, reconstruction_error


class VQAutoencoder(ConvAutoencoder):
    """Vector-quantised convolutional autoencoder (VQ-VAE, van den Oord et al. 2017).

    Images ``(C, H, W)`` <-> codes ``(c, H/f, W/f)`` from a codebook of ``codebook_size``
    vectors.

    Loss: ``mean(rho(x - D(z_q))) + mean((sg[z_e] - z_q)^2) + beta mean((z_e - sg[z_q])^2)``
    with the straight-through gradient (module docstring). ``encode`` returns the quantised
    code ``z_q`` (times the latent scale factor); ``decode`` first snaps its input to the
    nearest codebook vectors (identity on codes), so a latent diffusion's samples are
    decoded as codes, as Rombach et al. absorb the quantisation into the decoder.

    Args:
        latent_channels: channels c of the latent (the codebook vectors' dimension).
        codebook_size: number K of codebook vectors.
        commitment: beta, the weight of the commitment term (van den Oord et al. use 0.25).
        loss: reconstruction error, mean absolute (l1) or squared (l2, as van den Oord et al.).
    """

    def __init__(
        self,
        downsample: arch.Downsample = 4, latent_channels: arch.LatentChannels = 4,
        codebook_size: Annotated[int, Field(ge=2, le=65536)] = 256,
        commitment: Annotated[float, Field(ge=0, le=10)] = 0.25,
        channels: arch.Width = 16, channel_mult: arch.ChannelMult = [1, 2],  # noqa: B006
        blocks: arch.Blocks = 1, norm_groups: arch.NormGroups = 8,
        loss: arch.ReconstructionLoss = "l1",
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__("vq autoencoder", data_shape, downsample, latent_channels,
                         latent_channels, channels, channel_mult, blocks, norm_groups, loss)
        self.commitment = float(commitment)
        self.codebook = nn.Embedding(codebook_size, latent_channels)
        # van den Oord et al.'s reference initialisation: small, so that early encoder outputs
        # spread over many codes rather than collapsing on one far-away vector
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, k)``: each latent pixel's vector of ``z`` ``(B, c, h, w)`` replaced by its
        nearest codebook vector, and the codes' indices ``(B, h, w)``; no gradient reaches the
        codebook through the choice (it reaches it through ``z_q``'s values)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.codebook.weight.to(flat.dtype)
        # ||z||^2 - 2 z.e + ||e||^2, without the (B h w, K, c) difference tensor
        distances = (flat.square().sum(1, keepdim=True) - 2 * flat @ codebook.T
                     + codebook.square().sum(1)[None, :])
        index = distances.detach().argmin(dim=1)
        quantised = codebook[index].reshape(b, h, w, c).permute(0, 3, 1, 2)
        return quantised, index.reshape(b, h, w)

    def encode_unscaled(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """The quantised code ``z_q`` of ``x`` (deterministic: ``generator`` is unused)."""
        return self.quantise(self.encoder(x))[0]

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """The image of ``z`` snapped to its nearest codes."""
        return self.decoder(self.quantise(z)[0])

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction + codebook + ``beta`` commitment (module docstring)."""
        z_e = self.encoder(x)
        z_q, _ = self.quantise(z_e)
        straight_through = z_e + (z_q - z_e).detach()
        reconstruction = reconstruction_error(self.decoder(straight_through), x,
                                              self.reconstruction_loss)
        codebook = (z_e.detach() - z_q).square().mean()
        commitment = (z_e - z_q.detach()).square().mean()
        return reconstruction + codebook + self.commitment * commitment


__all__ = ["VQAutoencoder"]

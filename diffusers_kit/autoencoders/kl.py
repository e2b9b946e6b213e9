"""KL-regularised autoencoder: a VAE with a small KL weight (Kingma & Welling 2014; the
"KL-reg" first stage of Rombach et al. 2022, sec. 3.1 and app. G).

The encoder outputs, per latent element, the mean ``mu`` and log-variance ``log sigma^2`` of a
diagonal Gaussian posterior ``q(z | x) = N(mu(x), diag sigma^2(x))`` (log-variance clamped to
``[-30, 20]`` so ``exp`` stays finite); the decoder maps ``z`` back to the image. Training draws
``z = mu + sigma * eps`` (``eps ~ N(0, I)``, the reparameterisation trick, so the gradient flows
through ``mu`` and ``sigma``) and minimises, over a batch,

    L = mean_b [ (1/D) sum_i rho(x_i - D(z)_i)  +  beta (1/D) KL(q(z | x) || N(0, I)) ],
    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2),

with ``D = C * H * W`` the image's size and ``rho`` the absolute (``l1``) or squared (``l2``)
error: the reconstruction is the mean over pixels and the KL (summed over the latent elements
of one image) is divided by the same ``D``, so ``beta`` weighs nats of KL against the per-pixel
error exactly as in Rombach et al.'s objective (theirs sums the reconstruction over pixels; both
terms are here divided by ``D``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.autoencoders import blocks as arch
from diffusers_kit.autoencoders.blocks import ConvAutoencoder, reconstruction_error

LOGVAR_RANGE = (-30.0, 20.0)
"""Clamp of the posterior log-variance (as in Rombach et al.'s DiagonalGaussianDistribution)."""


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` of each row: ``1/2 sum (mu^2 + sigma^2 - 1 -
    log sigma^2)`` over every dimension but the first, shape ``(B,)``."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class KLAutoencoder(ConvAutoencoder):
    """KL-regularised convolutional autoencoder: a VAE with a small KL weight.

    Images ``(C, H, W)`` <-> latents ``(c, H/f, W/f)`` (Kingma & Welling 2014; Rombach et al.
    2022).

    Loss: ``mean(rho(x - D(mu + sigma eps))) + beta KL(q(z|x) || N(0, I)) / (C H W)`` with
    ``KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)`` (see the module docstring).
    ``encode`` returns the posterior mean (a draw when given a generator), times the latent
    scale factor.

    Args:
        loss: reconstruction error, mean absolute (l1, as Rombach et al.) or squared (l2).
        kl_weight: beta, the KL's weight per image element (nats of KL per image divided by
            C H W, against the per-pixel error). Rombach et al. use 1e-6 on 256x256 images; the
            default 1e-4 is the same light touch for small images (``docs/latent.md``). The KL
            keeps the latent's scale near 1 and its variance from collapsing; the scale factor
            does the rest (0: a plain autoencoder with noise).
    """

    def __init__(
        self,
        downsample: arch.Downsample = 4, latent_channels: arch.LatentChannels = 4,
        channels: arch.Width = 16, channel_mult: arch.ChannelMult = [1, 2],  # noqa: B006
        blocks: arch.Blocks = 1, norm_groups: arch.NormGroups = 8,
        loss: arch.ReconstructionLoss = "l1",
        kl_weight: Annotated[float, Field(ge=0, le=1)] = 1e-4,
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__("kl autoencoder", data_shape, downsample, latent_channels,
                         2 * latent_channels, channels, channel_mult, blocks, norm_groups, loss)
        self.kl_weight = float(kl_weight)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log sigma^2)`` of ``q(z | x)``, each of shape ``(B, c, H/f, W/f)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_unscaled(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """The posterior mean ``mu`` (``generator`` None) or a draw ``mu + sigma eps``."""
        mean, logvar = self.posterior(x)
        if generator is None:
            return mean
        return mean + (0.5 * logvar).exp() * self._noise(mean, generator)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean(rho(x - D(z))) + beta mean_b KL_b / (C H W)`` with ``z = mu + sigma eps``."""
        mean, logvar = self.posterior(x)
        z = mean + (0.5 * logvar).exp() * self._noise(mean, generator)
        reconstruction = reconstruction_error(self.decoder(z), x, self.reconstruction_loss)
        if self.kl_weight == 0:
            return reconstruction
        kl = gaussian_kl(mean, logvar).mean() / x[0].numel()
        return reconstruction + self.kl_weight * kl

    @staticmethod
    def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)


__all__ = ["LOGVAR_RANGE", "KLAutoencoder", "gaussian_kl"]

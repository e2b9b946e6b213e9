"""How well a first stage reconstructs held-out images (kind ``metric``, ``reconstruction``).

For a spec that trains an autoencoder (its ``autoencoder`` section, objective
``reconstruction``) and draws no samples: every held-out image ``x`` is reconstructed as
``D(E(x))`` with the posterior mean (no sampling noise; the latent scale cancels), and compared
with ``x`` by the restoration metrics of :mod:`diffusers_kit.metrics.restoration` — PSNR
``10 log10(R^2 / MSE)`` with ``R = high - low`` the data range, and SSIM (Wang et al. 2004) —
each the mean over images with its percentile bootstrap interval
(:mod:`diffusers_kit.metrics.floor`). The reconstruction bounds what latent diffusion can reach:
its samples are decoded by the same decoder (Rombach et al. 2022, sec. 4.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.data.base import DataSplits
from diffusers_kit.latent import in_batches
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import Level, Resamples
from diffusers_kit.metrics.restoration import PSNR, SSIM, DataValue

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

BATCH = 256
PREFIX = "recon_"


def reconstructions(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int = BATCH
                    ) -> torch.Tensor:
    """``D(E(x))`` (posterior means) of ``images``, in batches on the autoencoder's device,
    returned on the CPU."""
    return in_batches(autoencoder.reconstruct, images.cpu(), autoencoder,
                      tuple(images.shape[1:]), batch_size)


class ReconstructionQuality(Metric):
    """PSNR and SSIM of the run's autoencoder's reconstructions of the held-out images.

    Keys: ``recon_psnr``, ``recon_psnr_std``, ``recon_psnr_low``, ``recon_psnr_high``,
    ``recon_psnr_n``, and the same for ``recon_ssim``.

    Args:
        low: the lowest value of the data range (-1 for ``scale: symmetric``).
        high: the highest value of the data range (PSNR's peak is high - low).
        kernel_size: side of SSIM's Gaussian window (odd; at most the image side).
        sigma: standard deviation of SSIM's window.
        resamples: bootstrap resamples for the intervals of the means (0: none).
        level: confidence level of the intervals.
    """

    needs_samples = False

    def __init__(self, low: DataValue = -1.0, high: DataValue = 1.0,
                 kernel_size: Annotated[int, Field(ge=3, le=31)] = 7,
                 sigma: Annotated[float, Field(gt=0, le=100)] = 1.5,
                 resamples: Resamples = 1000, level: Level = 0.95) -> None:
        self.psnr = PSNR(low, high, resamples, level)
        self.ssim = SSIM(low, high, kernel_size, sigma, resamples, level)

    def evaluate(self, samples: torch.Tensor | None, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        autoencoder = getattr(model, "network", None)
        if not isinstance(autoencoder, Autoencoder):
            raise ValueError("the reconstruction metric needs an autoencoder model (a spec's "
                             "'autoencoder' section, e.g. kind: kl)")
        if tuple(data.heldout.shape[1:]) != tuple(autoencoder.data_shape):
            raise ValueError(f"the reconstruction metric compares images of the autoencoder's "
                             f"shape {tuple(autoencoder.data_shape)}; the held-out data have "
                             f"shape {tuple(data.heldout.shape[1:])}")
        heldout = data.heldout
        pairs = DataSplits(train=heldout, heldout=heldout)
        restored = reconstructions(autoencoder, heldout)
        out: dict[str, float] = {}
        for metric in (self.psnr, self.ssim):
            values = metric.evaluate(restored, pairs, generator)
            out.update({f"{PREFIX}{key}": value for key, value in values.items()})
        return out


__all__ = ["ReconstructionQuality", "reconstructions"]

"""Per-image fidelity of restorations to their ground truth: PSNR and SSIM (kind ``metric``).

For an inverse problem the samples are restorations of held-out examples: sample ``i`` restores
``heldout[i]``. Each image gets its own figure; the metric reports their mean, standard
deviation and the percentile bootstrap interval of the mean (:mod:`diffusers_kit.metrics.floor`).

- PSNR: ``10 log10(R^2 / MSE)`` with ``R = high - low`` the data range (in dB; higher is better).
- SSIM (Wang et al. 2004): the mean over Gaussian windows of
  ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
  ``C1 = (0.01 R)^2`` and ``C2 = (0.03 R)^2``; 1 for identical images.

Both are torchmetrics' (``peak_signal_noise_ratio``, ``structural_similarity_index_measure``),
given the range ``R`` as a number: values outside ``[low, high]`` are not clipped first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.hookspecs import OptionError
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.fidelity import torchmetrics_module
from diffusers_kit.metrics.floor import ErrorBars, Level, Resamples, mean_with_interval

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

DataValue = Annotated[float, Field(ge=-1e6, le=1e6)]


def _pairs(samples: torch.Tensor, data: DataSplits, name: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    if samples.dim() != 4:
        raise ValueError(f"{name} compares images (channels, height, width); these samples have "
                         f"shape {tuple(samples.shape[1:])}")
    n = min(len(samples), len(data.heldout))
    return samples[:n].detach().double().cpu(), data.heldout[:n].double().cpu()


def psnr_per_image(x: torch.Tensor, target: torch.Tensor, low: float, high: float
                   ) -> torch.Tensor:
    """PSNR of each image of ``x`` against the same row of ``target`` (dB); inf when equal."""
    # a float range, not (low, high): torchmetrics would clip the images to a tuple range
    peak_signal_noise_ratio = torchmetrics_module("functional.image").peak_signal_noise_ratio
    return peak_signal_noise_ratio(x, target, data_range=high - low, reduction="none",
                                   dim=(1, 2, 3))


def ssim_per_image(x: torch.Tensor, target: torch.Tensor, low: float, high: float,
                   kernel_size: int, sigma: float) -> torch.Tensor:
    """SSIM of each image of ``x`` against the same row of ``target``."""
    ssim = torchmetrics_module("functional.image").structural_similarity_index_measure
    return ssim(x, target, data_range=high - low,
                                               kernel_size=kernel_size, sigma=sigma,
                                               reduction="none")


class _Restoration(Metric):
    def __init__(self, low: float, high: float, resamples: int, level: float) -> None:
        if high <= low:
            raise ValueError(f"high ({high}) must exceed low ({low})")
        self.low, self.high = low, high
        self.bars = ErrorBars(resamples, level)


class PSNR(_Restoration):
    """Peak signal-to-noise ratio of each restoration to its held-out original (``psnr``,
    ``psnr_std``, ``psnr_low``, ``psnr_high``, ``psnr_n``).

    Args:
        low: the lowest value of the data range (-1 for ``scale: symmetric``).
        high: the highest value of the data range.
        resamples: bootstrap resamples for the interval of the mean (0: none).
        level: confidence level of the interval.
    """

    def __init__(self, low: DataValue = -1.0, high: DataValue = 1.0, resamples: Resamples = 1000,
                 level: Level = 0.95) -> None:
        super().__init__(low, high, resamples, level)

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        x, target = _pairs(samples, data, "psnr")
        values = psnr_per_image(x, target, self.low, self.high)
        return mean_with_interval("psnr", values, generator, self.bars)


class SSIM(_Restoration):
    """Structural similarity of each restoration to its held-out original (``ssim``,
    ``ssim_std``, ``ssim_low``, ``ssim_high``, ``ssim_n``).

    Args:
        low: the lowest value of the data range.
        high: the highest value of the data range.
        kernel_size: side of the Gaussian window (odd; at most the image side: 7 for 8x8).
        sigma: standard deviation of the window.
        resamples: bootstrap resamples for the interval of the mean (0: none).
        level: confidence level of the interval.
    """

    def __init__(self, low: DataValue = -1.0, high: DataValue = 1.0,
                 kernel_size: Annotated[int, Field(ge=3, le=31)] = 7,
                 sigma: Annotated[float, Field(gt=0, le=100)] = 1.5,
                 resamples: Resamples = 1000, level: Level = 0.95) -> None:
        super().__init__(low, high, resamples, level)
        if kernel_size % 2 == 0:
            raise OptionError("kernel_size", "an odd window width", kernel_size)
        self.kernel_size, self.sigma = kernel_size, sigma

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        x, target = _pairs(samples, data, "ssim")
        if min(x.shape[-2:]) < self.kernel_size:
            raise ValueError(f"ssim's kernel_size ({self.kernel_size}) exceeds the images' side "
                             f"{min(x.shape[-2:])}")
        values = ssim_per_image(x, target, self.low, self.high, self.kernel_size, self.sigma)
        return mean_with_interval("ssim", values, generator, self.bars)


__all__ = ["PSNR", "SSIM", "psnr_per_image", "ssim_per_image"]

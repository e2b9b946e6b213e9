"""Two components of the example plugin: a data set and a metric.

Each is an ordinary class deriving from the kind's base class. Its constructor signature is its
spec schema: dkit validates ``{kind: bars, size: 8}`` against ``Bars.__init__``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit import Dataset, DataSplits, Metric


class Bars(Dataset):
    """Synthetic images of horizontal and vertical bars (a classic toy image set).

    Each image is ``size x size`` with one to ``max_bars`` full rows or columns switched on;
    pixels are in [-1, 1].
    """

    modality = "image"

    def __init__(
        self,
        size: Annotated[int, Field(ge=4, le=64)] = 8,
        count: Annotated[int, Field(ge=10)] = 2000,
        max_bars: Annotated[int, Field(ge=1)] = 2,
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        seed: Annotated[int, Field(ge=0)] = 0,
    ) -> None:
        if max_bars > size:
            raise ValueError(f"max_bars ({max_bars}) cannot exceed size ({size})")
        self.size, self.count, self.max_bars = size, count, max_bars
        self.heldout_fraction, self.seed = heldout_fraction, seed

    def load(self) -> DataSplits:
        g = torch.Generator().manual_seed(self.seed)
        n, s = self.count, self.size
        images = torch.zeros(n, 1, s, s)
        vertical = torch.rand(n, generator=g) < 0.5
        bars = torch.randint(1, self.max_bars + 1, (n,), generator=g)
        for k in range(self.max_bars):  # loop over bar slots, not over images
            position = torch.randint(0, s, (n,), generator=g)
            on = (bars > k).float()[:, None]
            lines = torch.nn.functional.one_hot(position, s).float() * on
            images += torch.where(vertical[:, None, None, None],
                                  lines[:, None, None, :].expand(n, 1, s, s),
                                  lines[:, None, :, None].expand(n, 1, s, s))
        images = images.clamp(0, 1) * 2 - 1
        n_heldout = round(n * self.heldout_fraction)
        return DataSplits(train=images[n_heldout:], heldout=images[:n_heldout])

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1)


class MomentGap(Metric):
    """Gap between the per-pixel mean and standard deviation of samples and held-out data.

    Reports ``mean_gap = ||mean(samples) - mean(heldout)||_2 / sqrt(d)`` and the same for the
    standard deviations (``std_gap``).
    """

    def __init__(self, unbiased: bool = True) -> None:
        self.unbiased = unbiased

    def evaluate(
        self,
        samples: torch.Tensor,
        data: DataSplits,
        generator: torch.Generator,
        model: object = None,
    ) -> dict[str, float]:
        a, b = samples.flatten(1).double(), data.heldout.flatten(1).double()
        d = a.shape[1]
        mean_gap = (a.mean(0) - b.mean(0)).norm() / d**0.5
        std_gap = (a.std(0, unbiased=self.unbiased) - b.std(0, unbiased=self.unbiased)).norm()
        return {"mean_gap": float(mean_gap), "std_gap": float(std_gap / d**0.5)}

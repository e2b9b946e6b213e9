"""The 8x8 handwritten digits bundled with scikit-learn (1,797 images, UCI optdigits test set)."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.data.base import Dataset, DataSplits, package_file


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 64) in 0..16, labels (1797,) int64)``: scikit-learn's
    ``datasets/data/digits.csv.gz`` (64 pixel columns, then the label) read as
    ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (~2 s, paid by
    every command that loads the digits, ``dkit validate`` included)."""
    path = package_file("sklearn", "datasets/data/digits.csv.gz", "the digits data set",
                        "pip install scikit-learn", "scikit-learn")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


class Digits(Dataset):
    """8x8 grayscale digits from scikit-learn, with a seeded held-out split.

    Pixel values 0..16 are scaled to ``[-1, 1]`` (``scale: symmetric``) or ``[0, 1]``
    (``scale: unit``). Images have shape ``(1, size, size)``: the 8x8 originals, or enlarged
    by bilinear interpolation to 16x16 or 32x32 (smooth strokes at the same information, for
    models with several downsamplings such as latent diffusion's autoencoder).

    Args:
        heldout_fraction: share of the images held out for metrics (seeded split).
        scale: ``symmetric`` ([-1, 1]) or ``unit`` ([0, 1]) pixel values.
        split_seed: seed of the train / held-out split.
        size: image side in pixels: 8 (the originals), 16 or 32 (bilinear enlargements).
    """

    modality = "image"
    num_classes = 10

    def __init__(
        self,
        # of 1,797 images: at least 18 held out (for metrics) and 180 to train on
        heldout_fraction: Annotated[float, Field(ge=0.01, le=0.9)] = 0.2,
        scale: Literal["symmetric", "unit"] = "symmetric",
        split_seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
        size: Literal[8, 16, 32] = 8,
    ) -> None:
        self.heldout_fraction = heldout_fraction
        self.scale = scale
        self.split_seed = split_seed
        self.size = size

    def load(self) -> DataSplits:
        table, target = read_digits()
        images = table.reshape(-1, 8, 8).astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
        if self.scale == "symmetric":
            images = images * 2.0 - 1.0
        order = np.random.default_rng(self.split_seed).permutation(len(images))
        n_heldout = round(len(images) * self.heldout_fraction)
        data = torch.from_numpy(images[order]).unsqueeze(1)
        if self.size != 8:  # bilinear between pixel centres: values stay in the data's range
            data = torch.nn.functional.interpolate(data, size=(self.size, self.size),
                                                   mode="bilinear", align_corners=False)
        labels = torch.from_numpy(target[order])
        return DataSplits(train=data[n_heldout:].contiguous(),
                          heldout=data[:n_heldout].contiguous(),
                          train_labels=labels[n_heldout:].contiguous(),
                          heldout_labels=labels[:n_heldout].contiguous())

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1.0) / 2.0 if self.scale == "symmetric" else x
        return x.clamp(0.0, 1.0)

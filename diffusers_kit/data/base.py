"""Data sets: training and held-out tensors in model space, and how to show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class DataSplits:
    """Training and held-out data (float32, model space, first dimension = examples), with
    integer class labels when the data set has them (for class-conditional networks)."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_labels: torch.Tensor | None = None
    heldout_labels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.train.shape[1:])


class Dataset:
    """Base class of data sets (kind ``data``, the spec's ``data:`` section).

    ``modality`` tells the report stage how to draw samples: ``"image"`` (a grid; examples are
    ``(C, H, W)``) or ``"points"`` (a scatter plot; examples are vectors).
    """

    modality: Literal["image", "points"] = "image"
    num_classes: int | None = None

    def load(self) -> DataSplits:
        raise NotImplementedError

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Map model-space values to display space ([0, 1] for images)."""
        return x

"""Data sets: training and held-out tensors in model space, and how to show them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
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


def package_file(package: str, relative: str, what: str, how: str, pip: str) -> Path:
    """The file ``relative`` inside the installed ``package``, found without importing the
    package (importing scikit-learn costs ~2 s, reading its data files none). A missing package
    or file is a ``ValueError`` (a spec error, exit 2): ``what`` names the file for the user,
    ``how`` says how to install the package, ``pip`` is its pip name for a reinstall."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{what} is shipped by the {package} package, which is not installed: "
                         f"{how}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"{what} should be {path}, which the installed {package} package does "
                         f"not have (reinstall it: pip install --force-reinstall {pip})")
    return path


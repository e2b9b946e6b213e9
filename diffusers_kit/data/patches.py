"""Colour patches cut from the two photographs scikit-learn ships (no download).

scikit-learn installs ``china.jpg`` (a pagoda over a lake, trees) and ``flower.jpg`` (a dahlia
on a blurred green background), both 427 x 640 RGB, under ``sklearn/datasets/images``. They are
decoded here with Pillow straight from that folder (importing scikit-learn is not needed).

**Patches.** A patch is a square crop of ``size * zoom`` photograph pixels reduced to ``size``
pixels by area averaging (each output pixel is the mean of a ``zoom x zoom`` block), so a
16-pixel patch of the default zoom 4 shows 64 pixels' worth of structure (edges, roof tiles,
petals, leaves) rather than a few flat pixels. Values are in ``[-1, 1]``; shape
``(3, size, size)``.

**Split.** Each photograph is cut into a grid of blocks of about ``1.5 * size * zoom`` pixels
(at least 2 blocks per photograph); a seeded choice of ``round(heldout_fraction * blocks)``
blocks of each photograph (at least one, never all) is the held-out region. Held-out patches are
crops that lie wholly inside the held-out region, training patches crops that do not touch it, so
no training patch shares a pixel with a held-out one. The patches are spread evenly over the
photographs; positions are uniform over the allowed crops. Everything follows ``seed``.

Labels: the index of the source photograph in ``images`` (``num_classes = len(images)``).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.data.base import Dataset, DataSplits

Photo = Literal["china", "flower"]
PHOTO_SHAPE = (427, 640)  # height, width of both photographs
MAX_CROP = 192  # size * zoom: leaves at least 2 x 3 blocks of 1.5 crops in 427 x 640


def photograph_path(name: str) -> Path:
    """Path of one of scikit-learn's sample photographs (``china`` or ``flower``)."""
    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the patches data set needs scikit-learn's sample photographs "
                      "(pip install scikit-learn); scikit-learn is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    path = path / f"{name}.jpg"
    if not path.is_file():
        raise OSError(f"scikit-learn's sample photograph {path} is missing (expected it in the "
                      "installed package; reinstall scikit-learn)")
    return path


def load_photograph(name: str) -> np.ndarray:
    """One sample photograph as a ``(H, W, 3)`` uint8 array."""
    from PIL import Image

    with Image.open(photograph_path(name)) as image:
        return np.asarray(image.convert("RGB"))


def _block_edges(length: int, block: int) -> np.ndarray:
    count = max(1, length // block)
    return np.linspace(0, length, count + 1).round().astype(int)


def _window_sums(mask: np.ndarray, crop: int) -> np.ndarray:
    """Sum of ``mask`` over every ``crop x crop`` window (top-left corners), by an integral
    image: shape ``(H - crop + 1, W - crop + 1)``."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return (integral[crop:, crop:] - integral[:-crop, crop:] - integral[crop:, :-crop]
            + integral[:-crop, :-crop])


def _box_means(image: np.ndarray, zoom: int) -> np.ndarray:
    """Mean of every ``zoom x zoom`` window of ``image`` (top-left corners)."""
    h, w, c = image.shape
    integral = np.zeros((h + 1, w + 1, c), dtype=np.float64)
    integral[1:, 1:] = image.astype(np.float64).cumsum(0).cumsum(1)
    sums = (integral[zoom:, zoom:] - integral[:-zoom, zoom:] - integral[zoom:, :-zoom]
            + integral[:-zoom, :-zoom])
    return sums / (zoom * zoom)


class Patches(Dataset):
    """Colour patches of scikit-learn's two sample photographs, in ``[-1, 1]``, ``(3, s, s)``.

    Args:
        size: side of a patch in pixels (8, 16 or 32).
        zoom: photograph pixels per patch pixel: a patch is a ``size * zoom`` crop reduced by
            area averaging (``size * zoom`` at most 192).
        count: number of patches, training and held-out together.
        heldout_fraction: fraction of the patches held out (cut from a reserved region of each
            photograph that no training patch touches).
        seed: seed of the held-out regions and of the patch positions.
        images: which photographs to cut ("china", "flower"); patches are spread evenly.
    """

    modality = "image"

    def __init__(
        self,
        size: Literal[8, 16, 32] = 16,
        zoom: Annotated[int, Field(ge=1, le=24)] = 4,
        count: Annotated[int, Field(ge=2, le=1_000_000)] = 8000,
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
        images: Annotated[list[Photo], Field(min_length=1)] = ["china", "flower"],  # noqa: B006
    ) -> None:
        if size * zoom > MAX_CROP:
            raise ValueError(f"size * zoom at most {MAX_CROP} (crops must leave room for a "
                             f"held-out region in the {PHOTO_SHAPE[0]} x {PHOTO_SHAPE[1]} "
                             f"photographs); given {size} * {zoom} = {size * zoom}")
        self.size, self.zoom, self.count = size, zoom, count
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.images: list[str] = list(dict.fromkeys(images))
        self.num_classes = len(self.images)
        self.n_heldout = min(max(1, round(count * heldout_fraction)), count - 1)
        # after load(): (photograph index, top, left) of each patch's crop, per split
        self.corners: dict[str, np.ndarray] = {}

    @property
    def crop(self) -> int:
        return self.size * self.zoom

    def heldout_mask(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Boolean ``(H, W)`` mask of the held-out blocks of one photograph."""
        block = (3 * self.crop) // 2
        rows, cols = _block_edges(shape[0], block), _block_edges(shape[1], block)
        n_blocks = (len(rows) - 1) * (len(cols) - 1)
        if n_blocks < 2:
            raise ValueError(f"a photograph of {shape[0]} x {shape[1]} pixels is too small for "
                             f"held-out blocks of crops of {self.crop} pixels")
        n_held = min(max(1, round(self.heldout_fraction * n_blocks)), n_blocks - 1)
        mask = np.zeros(shape, dtype=bool)
        for index in rng.choice(n_blocks, size=n_held, replace=False):
            r, c = divmod(int(index), len(cols) - 1)
            mask[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = True
        return mask

    def _cut(self, means: np.ndarray, corners: np.ndarray) -> np.ndarray:
        """Patches ``(n, size, size, 3)`` whose crops start at ``corners`` (flat indices into
        the ``(H - crop + 1, W - crop + 1)`` grid of window positions)."""
        width = means.shape[1] - self.crop + self.zoom  # window grid width = W - crop + 1
        ys, xs = np.divmod(corners, width)
        steps = np.arange(self.size) * self.zoom
        return means[(ys[:, None] + steps)[:, :, None], (xs[:, None] + steps)[:, None, :]]

    def load(self) -> DataSplits:
        rng = np.random.default_rng(self.seed)
        n_images = len(self.images)
        n_train = self.count - self.n_heldout
        train_each = [len(c) for c in np.array_split(np.arange(n_train), n_images)]
        held_each = [len(c) for c in np.array_split(np.arange(self.n_heldout), n_images)]
        parts: dict[str, list[np.ndarray]] = {"train": [], "heldout": [], "train_labels": [],
                                              "heldout_labels": [], "train_corners": [],
                                              "heldout_corners": []}
        for label, name in enumerate(self.images):
            photo = load_photograph(name)
            mask = self.heldout_mask(photo.shape[:2], rng)
            held = _window_sums(mask, self.crop)
            means = _box_means(photo, self.zoom)
            allowed = {"train": np.flatnonzero(held == 0),
                       "heldout": np.flatnonzero(held == self.crop * self.crop)}
            for split, n in (("train", train_each[label]), ("heldout", held_each[label])):
                if n == 0:
                    continue
                corners = rng.choice(allowed[split], size=n, replace=True)
                parts[split].append(self._cut(means, corners))
                parts[f"{split}_labels"].append(np.full(n, label, dtype=np.int64))
                ys, xs = np.divmod(corners, photo.shape[1] - self.crop + 1)
                parts[f"{split}_corners"].append(np.stack([np.full(n, label), ys, xs], 1))

        def tensor(split: str) -> tuple[torch.Tensor, torch.Tensor]:
            pixels = np.concatenate(parts[split])
            labels = np.concatenate(parts[f"{split}_labels"])
            order = rng.permutation(len(pixels))
            self.corners[split] = np.concatenate(parts[f"{split}_corners"])[order]
            images = pixels[order].transpose(0, 3, 1, 2) / 127.5 - 1.0
            return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                    torch.from_numpy(labels[order]))

        train, train_labels = tensor("train")
        heldout, heldout_labels = tensor("heldout")
        return DataSplits(train=train, heldout=heldout, train_labels=train_labels,
                          heldout_labels=heldout_labels)

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

"""Colour patches cut from photographs that an installed package ships (no download).

:class:`PhotoPatches` holds the cutting and the split; a subclass names its photographs
(:class:`PhotoRecord`: file, size, author, source and licence). :class:`Patches` cuts the two
photographs scikit-learn installs, ``china.jpg`` (a pagoda over a lake, trees) and
``flower.jpg`` (a dahlia on a blurred green background), both 427 x 640 RGB, under
``sklearn/datasets/images``; :class:`~diffusers_kit.data.photos.Photos` cuts scikit-image's
public-domain ones. Files are decoded with Pillow straight from the package's folder (the
package is never imported, so nothing can be fetched).

**Patches.** A patch is a square crop of ``size * zoom`` photograph pixels reduced to ``size``
pixels by area averaging (each output pixel is the mean of a ``zoom x zoom`` block), so a
16-pixel patch of zoom 4 shows 64 pixels' worth of structure (edges, roof tiles, petals,
leaves) rather than a few flat pixels. Values are in ``[-1, 1]``; shape ``(3, size, size)``; a
grayscale photograph's one channel is repeated in all three.

**Split.** Each photograph is cut into a grid of blocks of about ``1.5 * size * zoom`` pixels
(at least 2 blocks per photograph, which bounds ``size * zoom``); a seeded choice of
``round(heldout_fraction * blocks)`` blocks of each photograph (at least one, never all) is the
held-out region. Held-out patches are crops that lie wholly inside the held-out region, training
patches crops that do not touch it, so no training patch shares a pixel with a held-out one. The
patches are spread evenly over the photographs; positions are uniform over the allowed crops.
Everything follows ``seed``.

Labels: the index of the source photograph in ``images`` (``num_classes = len(images)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.data.base import Dataset, DataSplits, package_file

Photo = Literal["china", "flower"]


@dataclass(frozen=True)
class PhotoRecord:
    """One photograph a package ships: where it lies, what it shows and its licence.

    ``package`` and ``folder`` locate the file (``<package>/<folder>/<file>`` in the installed
    package); ``extra`` is the optional dependency group of dkit that installs the package
    (``None`` for a required dependency); ``shape`` is ``(height, width)``; ``licence_url`` is
    the licence's text or, for a public-domain work, where that is stated.
    """

    name: str
    file: str
    package: str
    folder: str
    extra: str | None
    shape: tuple[int, int]
    grayscale: bool
    title: str
    author: str
    source: str
    licence: str
    licence_url: str

    def path(self) -> Path:
        """The installed file; a ``ValueError`` (a spec error, exit 2) naming the package to
        install when it is missing."""
        pip = f"diffusers_kit[{self.extra}]" if self.extra else self.package
        how = (f"install the optional '{self.extra}' extra: pip install {pip}" if self.extra
               else f"pip install {pip}")
        return package_file(self.package, f"{self.folder}/{self.file}",
                            f"the photograph {self.name!r}", how, pip)

    def load(self) -> np.ndarray:
        """The photograph as a ``(H, W, 3)`` uint8 array (a grayscale one repeated)."""
        from PIL import Image

        with Image.open(self.path()) as image:
            return np.asarray(image.convert("RGB"))


#: scikit-learn's two photographs (sklearn/datasets/images/README.txt): CC BY 2.0, so a figure
#: made from them must credit the photographers. The README names danielbuechele for both,
#: while its link for flower.jpg is to the Flickr account vultilion; both are given here.
SKLEARN_PHOTOGRAPHS: dict[str, PhotoRecord] = {
    "china": PhotoRecord(
        "china", "china.jpg", "sklearn", "datasets/images", None, (427, 640), False,
        "a pagoda over a lake", "danielbuechele (Flickr)",
        "https://www.flickr.com/photos/danielbuechele/6061409035/",
        "CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/"),
    "flower": PhotoRecord(
        "flower", "flower.jpg", "sklearn", "datasets/images", None, (427, 640), False,
        "a dahlia", "vultilion (Flickr; scikit-learn's README credits danielbuechele)",
        "https://www.flickr.com/photos/vultilion/6056698931/",
        "CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/"),
}


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


def _blocks(shape: tuple[int, int], crop: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column edges of the held-out blocks of a ``shape`` photograph for crops of
    ``crop`` pixels, or ``None`` when the photograph cannot hold them (fewer than 2 blocks, or
    a block smaller than a crop)."""
    if crop > min(shape):
        return None
    block = (3 * crop) // 2
    rows, cols = _block_edges(shape[0], block), _block_edges(shape[1], block)
    if (len(rows) - 1) * (len(cols) - 1) < 2:
        return None
    return rows, cols


class PhotoPatches(Dataset):
    """Base of the photograph patch data sets: the cutting and the split of the module
    docstring over the photographs in ``photographs`` (name -> :class:`PhotoRecord`).

    A subclass sets ``photographs`` and declares its options (their bounds and the allowed
    ``images``) in its own constructor, which calls this one.
    """

    modality = "image"
    photographs: ClassVar[dict[str, PhotoRecord]] = {}

    def __init__(self, size: int, zoom: int, count: int, heldout_fraction: float, seed: int,
                 images: list[str]) -> None:
        self.size, self.zoom, self.count = size, zoom, count
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.images: list[str] = list(dict.fromkeys(images))
        shapes = [self.photographs[name].shape for name in self.images]
        if any(_blocks(shape, self.crop) is None for shape in shapes):
            largest = max(c for c in range(1, min(map(min, shapes)) + 1)
                          if all(_blocks(shape, c) is not None for shape in shapes))
            sizes = ", ".join(f"{name} {h} x {w}" for name, (h, w) in zip(self.images, shapes,
                                                                          strict=True))
            raise ValueError(f"size * zoom at most {largest} for the photographs {sizes} "
                             "(each must hold at least two blocks of 1.5 crops: a held-out "
                             f"region and a training one), not {size} * {zoom} = {self.crop}")
        for name in self.images:
            self.photographs[name].path()  # the package and its file are there
        self.num_classes = len(self.images)
        self.n_heldout = min(max(1, round(count * heldout_fraction)), count - 1)
        # after load(): (photograph index, top, left) of each patch's crop, per split
        self.corners: dict[str, np.ndarray] = {}

    @property
    def licences(self) -> list[PhotoRecord]:
        """Author, source and licence of every photograph used, in label order."""
        return [self.photographs[name] for name in self.images]

    @property
    def crop(self) -> int:
        return self.size * self.zoom

    def heldout_mask(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Boolean ``(H, W)`` mask of the held-out blocks of one photograph."""
        edges = _blocks(shape, self.crop)
        if edges is None:
            raise ValueError(f"a photograph of {shape[0]} x {shape[1]} pixels is too small for "
                             f"held-out blocks of crops of {self.crop} pixels")
        rows, cols = edges
        n_blocks = (len(rows) - 1) * (len(cols) - 1)
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
            photo = self.photographs[name].load()
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


class Patches(PhotoPatches):
    """Colour patches of scikit-learn's two sample photographs, in ``[-1, 1]``, ``(3, s, s)``.

    The photographs are CC BY 2.0 (:data:`SKLEARN_PHOTOGRAPHS`: a published figure cut from them
    credits the photographers); :class:`~diffusers_kit.data.photos.Photos` has public-domain ones.

    Args:
        size: side of a patch in pixels (8, 16 or 32).
        zoom: photograph pixels per patch pixel: a patch is a ``size * zoom`` crop reduced by
            area averaging (``size * zoom`` at most 213: two blocks of 1.5 crops across the
            640-pixel width).
        count: number of patches, training and held-out together.
        heldout_fraction: fraction of the patches held out (cut from a reserved region of each
            photograph that no training patch touches).
        seed: seed of the held-out regions and of the patch positions.
        images: which photographs to cut ("china", "flower"); patches are spread evenly.
    """

    photographs = SKLEARN_PHOTOGRAPHS

    def __init__(
        self,
        size: Literal[8, 16, 32] = 16,
        zoom: Annotated[int, Field(ge=1, le=24)] = 4,
        count: Annotated[int, Field(ge=2, le=1_000_000)] = 8000,
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
        images: Annotated[list[Photo], Field(min_length=1)] = ["china", "flower"],  # noqa: B006
    ) -> None:
        super().__init__(size, zoom, count, heldout_fraction, seed, images)

"""Images from a folder (kind ``data``, name ``image_folder``): the user's own pictures.

Every file whose extension is one Pillow can open (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
``.gif``, ``.tif``, ``.webp``, ...) is read; other files and hidden files (names starting with a
dot) are skipped. Each image is turned upright by its EXIF orientation, converted to grayscale
(``channels: 1``) or RGB (``channels: 3``), its shorter side resized to ``size`` and the
centre cropped to ``size x size``. Pixels are mapped to ``[-1, 1]`` from their own full scale:
255 for 8-bit images, 65535 for 16-bit grayscale ones (PNG, TIFF). Nothing is written.

With ``labels: subfolders`` the class of an image is the name of the sub-folder of ``path`` it
lies in (classes numbered in sorted order of those names; ``classes`` lists them); images lying
directly in ``path`` are then an error. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.data.base import Dataset, DataSplits


def image_extensions() -> set[str]:
    """File extensions (lower case, with the dot) of the formats Pillow can open."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# Pillow modes of grayscale images wider than 8 bits, with their full-scale value
WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
              "I": 65535.0}

class ImageFolder(Dataset):
    """Images from a folder (PNG, JPEG, BMP, anything Pillow opens), resized and centre-cropped.

    Args:
        path: the folder (relative to the working directory).
        size: side of the square images, in pixels (shorter side resized, centre cropped).
        channels: 1 (grayscale) or 3 (RGB); images are converted.
        recursive: also read images in sub-folders, at any depth.
        labels: "subfolders" to label each image by the sub-folder of ``path`` it lies in
            (implies reading the sub-folders); null for no labels.
        heldout_fraction: fraction of the images held out (at least one image).
        seed: seed of the split (and of which images ``limit`` keeps).
        limit: read at most this many images (a seeded choice); null for all.
    """

    modality = "image"

    def __init__(
        self,
        path: str,
        size: Annotated[int, Field(ge=2, le=4096)] = 32,
        channels: Literal[1, 3] = 3,
        recursive: bool = False,
        labels: Literal["subfolders"] | None = None,
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1,
        seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
        limit: Annotated[int, Field(ge=2, le=10_000_000)] | None = None,
    ) -> None:
        self.path = Path(os.path.expanduser(path))
        self.size, self.channels, self.recursive, self.labels = size, channels, recursive, labels
        self.heldout_fraction, self.seed, self.limit = heldout_fraction, seed, limit
        self.classes: list[str] = []
        self.num_classes = None

    def files(self) -> list[Path]:
        """The image files, sorted (raises ``OSError`` / ``ValueError`` when there are none)."""
        root = self.path
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist (expected a folder of "
                                    f"images; working directory {Path.cwd()})")
        if not root.is_dir():
            raise NotADirectoryError(f"image folder {root} is a file, not a folder of images")
        extensions = image_extensions()
        deep = self.recursive or self.labels == "subfolders"
        candidates = root.rglob("*") if deep else root.iterdir()
        found: list[Path] = []
        others: list[str] = []
        for file in candidates:
            relative = file.relative_to(root)
            if any(part.startswith(".") for part in relative.parts) or not file.is_file():
                continue
            if not self.recursive and len(relative.parts) > 2:
                continue  # labels: subfolders without recursive: one level down only
            if file.suffix.lower() in extensions:
                found.append(file)
            else:
                others.append(str(relative))
        found.sort()
        if not found:
            where = "or its sub-folders " if deep else ""
            seen = f"found only {_listing(sorted(others))}" if others else "found no files"
            folders = sorted(f.name for f in root.iterdir()
                             if f.is_dir() and not f.name.startswith("."))
            if folders and not deep:
                seen += (f" but sub-folders {_listing(folders)}: set recursive: true, or "
                         "labels: subfolders to label images by sub-folder")
            raise ValueError(f"no images in folder {root} {where}(expected files Pillow opens: "
                             f".png, .jpg, .jpeg, .bmp, ...; {seen})")
        if self.labels == "subfolders":
            loose = [str(f.relative_to(root)) for f in found if f.parent == root]
            if loose:
                raise ValueError(f"with labels: subfolders every image in {root} must lie in a "
                                 f"sub-folder named after its class; found "
                                 f"{_listing(loose)} directly in the folder")
        return found

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image, ImageOps

        try:
            with Image.open(file) as image:
                image = ImageOps.exif_transpose(image)
                w, h = image.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                box = (left, top, left + side, top + side)
                size = (self.size, self.size)
                if image.mode in WIDE_MODES:  # 16-bit grayscale: resized in floats, then
                    # scaled by its own full scale (converting to 8 bits would clip at 255)
                    full = WIDE_MODES[image.mode]
                    wide = Image.fromarray(np.asarray(image, dtype=np.float32))
                    wide = wide.resize(size, Image.Resampling.BICUBIC, box=box)
                    gray = np.clip(np.asarray(wide, dtype=np.float32), 0.0, full)
                    pixels = gray / (full / 2.0) - 1.0
                    pixels = pixels[None] if self.channels == 1 else np.stack([pixels] * 3)
                    return pixels.astype(np.float32)
                image = image.convert("L" if self.channels == 1 else "RGB")
                image = image.resize(size, Image.Resampling.BICUBIC, box=box)
                eight = np.asarray(image, dtype=np.uint8)
        except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
            raise OSError(f"cannot read image {file} (expected an image Pillow opens: {exc})"
                          ) from exc
        eight = eight[None] if eight.ndim == 2 else eight.transpose(2, 0, 1)
        return eight.astype(np.float32) / 127.5 - 1.0

    def load(self) -> DataSplits:
        files = self.files()
        if self.labels == "subfolders":
            self.classes = sorted({f.relative_to(self.path).parts[0] for f in files})
            self.num_classes = len(self.classes)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(files))
        if self.limit is not None:
            order = order[: self.limit]
        if len(order) < 2:
            raise ValueError(f"at least 2 images in {self.path} (one to train on, one held "
                             f"out); found {len(order)}")
        chosen = [files[i] for i in order]
        pixels = np.stack([self._read(f) for f in chosen])
        data = torch.from_numpy(pixels)
        n_heldout = min(max(1, round(len(chosen) * self.heldout_fraction)), len(chosen) - 1)
        train_labels = heldout_labels = None
        if self.labels == "subfolders":
            index = {name: i for i, name in enumerate(self.classes)}
            labels = torch.tensor([index[f.relative_to(self.path).parts[0]] for f in chosen],
                                  dtype=torch.int64)
            train_labels, heldout_labels = labels[n_heldout:], labels[:n_heldout]
        return DataSplits(train=data[n_heldout:].contiguous(),
                          heldout=data[:n_heldout].contiguous(),
                          train_labels=train_labels, heldout_labels=heldout_labels)

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

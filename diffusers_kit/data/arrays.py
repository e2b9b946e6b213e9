"""Arrays from a ``.npz`` or ``.npy`` file (kind ``data``, name ``npz``).

The file is read by :class:`~diffusers_kit.arrays.ArrayFile`, the one reader of every array
input: with ``allow_pickle=False`` (no code in a data file is ever run), refusing truncated,
structured, datetime, object, empty and non-finite arrays with a message naming the file. From
a ``.npz`` archive the data are the array named ``key`` (by default the one named ``x``, or the
only array besides ``labels_key``); a ``.npy`` file holds one array and takes no keys.

**Shapes.** ``modality: image``: ``(N, C, H, W)`` with C = 1 or 3, ``(N, H, W, C)`` (channels
last, recognised when the second axis is not 1 or 3 and the last one is; transposed), or
``(N, H, W)`` (grayscale; a channel axis is added). ``modality: vector``: ``(N, d)``; the report
draws a scatter plot of the first two coordinates.

**Scale.** ``scale: symmetric`` maps pixel intensities to ``[-1, 1]``: integer arrays are read
as 8-bit intensities in ``[0, 255]`` (``x / 127.5 - 1``), float arrays must lie in ``[0, 1]``
(``2 x - 1``); values outside those ranges are an error. ``scale: none`` keeps the values as
they are (converted to float32). Images are displayed by mapping ``[-1, 1]`` to ``[0, 1]``
(``symmetric``) or the training data's own minimum..maximum to ``[0, 1]`` (``none``).

Labels (``labels_key``): a 1-D array of non-negative integers, one per example.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.arrays import ArrayFile, ArrayFileError
from diffusers_kit.data.base import Dataset, DataSplits

__all__ = ["ArrayFile", "ArrayFileError", "NpzArrays"]  # the reader's names, as before


class NpzArrays(Dataset):
    """Arrays (images or vectors) from a ``.npz`` / ``.npy`` file, with optional labels.

    Args:
        path: the ``.npz`` or ``.npy`` file (relative to the working directory).
        key: the array to use in a ``.npz`` archive; null: ``x``, or the only array there is
            (besides ``labels_key``).
        labels_key: the array of integer class labels in a ``.npz`` archive; null for none.
        modality: "image" ((N, C, H, W), (N, H, W, C) or (N, H, W)) or "vector" ((N, d)).
        scale: "symmetric" maps 8-bit integers in [0, 255] or floats in [0, 1] to [-1, 1];
            "none" keeps the values.
        heldout_fraction: fraction of the examples held out (at least one).
        seed: seed of the split.
    """

    def __init__(
        self,
        path: str,
        key: str | None = None,
        labels_key: str | None = None,
        modality: Literal["image", "vector"] = "image",
        scale: Literal["none", "symmetric"] = "symmetric",
        heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1,
        seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
    ) -> None:
        self.path = Path(os.path.expanduser(path))
        self.key, self.labels_key = key, labels_key
        self.kind = modality
        self.modality = "image" if modality == "image" else "points"
        self.scale = scale
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.num_classes = None
        self._range = (-1.0, 1.0)

    # -- reading ---------------------------------------------------------------------------
    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The data array and the labels array (or None), as stored."""
        path = self.path
        with ArrayFile(path) as file:
            if not file.names:  # a .npy file
                if self.key is not None or self.labels_key is not None:
                    given = "key" if self.key is not None else "labels_key"
                    raise ValueError(f"{given} only for a .npz archive; {path} holds a single "
                                     "array (.npy): leave key and labels_key out")
                return file.array(), None
            keys = file.names
            listed = ", ".join(keys) or "none"
            for given, name in (("key", self.key), ("labels_key", self.labels_key)):
                if name is not None and name not in keys:
                    raise ValueError(f"{given} {name!r} is not an array in {path}; "
                                     f"its arrays are: {listed}")
            key = self.key
            if key is None:
                rest = [k for k in keys if k != self.labels_key]
                if "x" in rest:
                    key = "x"
                elif len(rest) == 1:
                    key = rest[0]
                else:
                    raise ValueError(f"key: which array of {path} to use (no array named 'x' "
                                     f"and not just one); its arrays are: {listed}")
            data = file.array(key)
            labels = None if self.labels_key is None else file.array(self.labels_key)
        return data, labels

    def _shape(self, data: np.ndarray) -> np.ndarray:
        where = f"array of {self.path}"
        if self.kind == "vector":
            if data.ndim != 2:
                raise ValueError(f"modality vector: an (N, d) {where}; found shape "
                                 f"{data.shape}")
            return data
        if data.ndim == 3:
            return data[:, None]
        if data.ndim == 4:
            if data.shape[1] not in (1, 3) and data.shape[-1] in (1, 3):
                data = data.transpose(0, 3, 1, 2)  # channels last
            if data.shape[1] not in (1, 3):
                raise ValueError(f"modality image: 1 or 3 channels in the {where} ((N, C, H, W) "
                                 f"or (N, H, W, C)); found shape {data.shape} (use modality: "
                                 "vector for other data)")
            return data
        raise ValueError(f"modality image: an (N, C, H, W), (N, H, W, C) or (N, H, W) {where}; "
                         f"found shape {data.shape}")

    def _scaled(self, data: np.ndarray) -> np.ndarray:
        if data.dtype == np.bool_:
            data = data.astype(np.float32)
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise ValueError(f"a numeric array in {self.path}; found dtype {data.dtype}")
        if self.scale == "none" or data.size == 0:
            return data.astype(np.float32)
        low, high = data.min(), data.max()
        if np.issubdtype(data.dtype, np.integer):
            if low < 0 or high > 255:
                raise ValueError(f"scale symmetric: integers in [0, 255] in {self.path}; found "
                                 f"[{low}, {high}] (use scale: none to keep the values)")
            return (data.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
        if low < 0 or high > 1:
            raise ValueError(f"scale symmetric: floats in [0, 1] in {self.path}; found "
                             f"[{low:.4g}, {high:.4g}] (use scale: none to keep the values)")
        return (data.astype(np.float32) * 2.0 - 1.0).astype(np.float32)

    def _labels(self, labels: np.ndarray, n: int) -> np.ndarray:
        name = f"labels {self.labels_key!r} of {self.path}"
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"{name}: one label per example, shape ({n},); found shape "
                             f"{labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: integer class labels; found dtype {labels.dtype}")
        if n and labels.min() < 0:
            raise ValueError(f"{name}: class labels >= 0; found {labels.min()}")
        return labels.astype(np.int64)

    def load(self) -> DataSplits:
        data, labels = self.read()
        data = self._scaled(self._shape(data))
        n = len(data)
        if n < 2:
            raise ValueError(f"at least 2 examples in {self.path} (one to train on, one held "
                             f"out); found {n}")
        if labels is not None:
            labels = self._labels(labels, n)
            self.num_classes = int(labels.max()) + 1
        order = np.random.default_rng(self.seed).permutation(n)
        n_heldout = min(max(1, round(n * self.heldout_fraction)), n - 1)
        tensor = torch.from_numpy(np.ascontiguousarray(data[order]))
        train, heldout = tensor[n_heldout:].contiguous(), tensor[:n_heldout].contiguous()
        if self.scale == "none":
            self._range = (float(train.min()), float(train.max()))
        train_labels = heldout_labels = None
        if labels is not None:
            ordered = torch.from_numpy(labels[order])
            train_labels, heldout_labels = ordered[n_heldout:], ordered[:n_heldout]
        return DataSplits(train=train, heldout=heldout, train_labels=train_labels,
                          heldout_labels=heldout_labels)

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality != "image":
            return x
        low, high = self._range
        return ((x - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)

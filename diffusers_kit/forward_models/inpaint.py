"""Inpainting: observe the kept pixels of ``x``, ``y = x[kept] + sigma_y * n``.

The measurement is the **vector of kept entries** (``measurement_shape = (m,)``, in the order of
the flattened data), not an image with zeros in the hole: ``A`` is then a row selection of the
identity, with full row rank, ``A A^T = I_m`` and i.i.d. noise on exactly the observed entries
(DDRM's ``H``, Kawar et al. 2022, app. A). The zero-filled image is ``A_adjoint(y)`` (equal to
``pinv(y)``); :attr:`Inpaint.mask` is the boolean mask itself, for methods that replace the known
part (score-SDE imputation, RePaint).

SVD: ``s = 1`` (``r = m``); ``V^T`` permutes ``x`` to ``[x[kept], x[hole]]``; ``U`` is the
identity. A mask acts on the spatial positions of every channel alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.arrays import ArrayFile, ArrayFileError
from diffusers_kit.forward_models.base import (
    ForwardModel,
    IdentityMeasurementBasis,
    NoiseKind,
    Photons,
    SigmaY,
)
from diffusers_kit.hookspecs import OptionError

MASKS = ("box", "random", "half", "left", "center")
Fraction = Annotated[float, Field(ge=0, le=1)]


class Inpaint(IdentityMeasurementBasis, ForwardModel):
    """Inpainting: the measurement is the vector of kept pixels (all channels).

    Works for images ``(C, H, W)`` (the mask is over ``(H, W)``, shared by the channels) and for
    vectors ``(d,)`` (the mask is over the coordinates). Names say what is **missing**:

    - ``box``: a hole of ``box_size`` (a fraction of every side), at ``box_position`` (one
      fraction per spatial dimension of the free range: 0 = top / left edge, 1 = bottom / right,
      0.5 = centred), or at a position drawn with ``seed`` when that is not given;
    - ``center``: the same hole, centred;
    - ``random``: every position but a random ``rate`` of them (drawn with ``seed``) is missing;
    - ``half``: the second half along the first spatial dimension is missing (the bottom rows;
      for a vector, its second half);
    - ``left``: the first half along the last spatial dimension is missing (the left columns;
      for a vector, its first half);
    - a path to a ``.npy`` / ``.npz`` file (key ``mask`` or its only array) holding a 0/1 or
      boolean mask, 1 = **kept**, of the spatial shape, ``(1, *spatial)`` or the data shape.

    Args:
        mask: one of the names above or a path.
        rate: fraction of positions kept by ``random`` (at least one is kept).
        box_size: side of the ``box`` / ``center`` hole, as a fraction of every side.
        box_position: where the ``box`` hole lies (see above); only for ``mask: box``.
        seed: draws the ``random`` mask and an unplaced ``box``.
    """

    def __init__(self, mask: str = "center", rate: Annotated[float, Field(gt=0, le=1)] = 0.5,
                 box_size: Annotated[float, Field(gt=0, le=1)] = 0.5,
                 box_position: list[Fraction] | None = None,
                 seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0, sigma_y: SigmaY = 0.0,
                 noise: NoiseKind = "gaussian", photons: Photons = None, *,
                 data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        shape = self.data_shape
        if len(shape) == 1:
            channels, spatial = 1, shape
        elif len(shape) == 3:
            channels, spatial = shape[0], shape[1:]
        else:
            raise ValueError(f"inpaint needs images (C, H, W) or vectors (d,); this data set's "
                             f"examples have shape {shape}")
        if box_position is not None and mask != "box":
            raise OptionError("box_position", f"null with mask: {mask} (box_position places "
                              "mask: box)", box_position)
        if mask == "random":
            kept = _random_mask(spatial, rate, seed)
        elif mask in ("box", "center"):
            position = [0.5] * len(spatial) if mask == "center" else box_position
            kept = _box_mask(spatial, box_size, position, seed)
        elif mask == "half":
            kept = torch.ones(spatial, dtype=torch.bool)
            kept[spatial[0] - spatial[0] // 2:] = False
        elif mask == "left":
            kept = torch.ones(spatial, dtype=torch.bool)
            kept[..., : spatial[-1] // 2] = False
        else:
            kept = _load_mask(mask, shape, spatial)
        if tuple(kept.shape) != shape:  # a spatial mask: shared by every channel
            kept = kept.reshape(1, *spatial).expand(channels, *spatial)
        kept = kept.contiguous()
        if not kept.any():
            raise OptionError("mask", f"a mask that keeps a pixel of data of shape {shape} "
                              "(this one keeps none)", mask)
        self.mask = kept
        """Boolean mask of the data shape, True where ``x`` is observed."""
        flat = kept.reshape(-1)
        kept_index = torch.nonzero(flat).reshape(-1)
        order = torch.cat([kept_index, torch.nonzero(~flat).reshape(-1)])
        self.keep("kept", kept_index)
        self.keep("order", order)
        self.keep("inverse", torch.argsort(order))
        self.keep("mask", kept.to(torch.float64))
        self.measurement_shape = (int(kept_index.numel()),)
        self.keep("singulars", torch.ones(self.m, dtype=torch.float64))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return x.reshape(b, self.d).index_select(1, self.table("kept", x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The zero-filled image: ``y`` at the kept positions, 0 in the hole."""
        b = self.check(y, self.measurement_shape, "a measurement")
        out = y.new_zeros(b, self.d).index_copy(1, self.table("kept", y), y)
        return out.reshape(b, *self.data_shape)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``A^+ = A^T`` since ``A A^T = I``."""
        return self.A_adjoint(y)

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return x.reshape(b, self.d).index_select(1, self.table("order", x))

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")
        return z.index_select(1, self.table("inverse", z)).reshape(b, *self.data_shape)


def _random_mask(spatial: tuple[int, ...], rate: float, seed: int) -> torch.Tensor:
    n = math.prod(spatial)
    count = min(n, max(1, round(rate * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[:count]] = True
    return kept.reshape(spatial)


def _box_mask(spatial: tuple[int, ...], size: float, position: list[float] | None,
              seed: int) -> torch.Tensor:
    if position is not None and len(position) != len(spatial):
        raise ValueError(f"box_position: expected {len(spatial)} fractions (one per spatial "
                         f"dimension of {spatial}), given {list(position)}")
    if position is None:
        generator = torch.Generator().manual_seed(seed)
        position = torch.rand(len(spatial), generator=generator, dtype=torch.float64).tolist()
    kept = torch.ones(spatial, dtype=torch.bool)
    hole = []
    for n, p in zip(spatial, position, strict=True):
        length = min(n, max(1, round(size * n)))
        start = round(p * (n - length))
        hole.append(slice(start, start + length))
    kept[tuple(hole)] = False
    return kept


def _load_mask(source: str, shape: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    path = Path(source).expanduser()
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"mask: expected one of {', '.join(MASKS)} or a path to a .npy/.npz "
                         f"file, given {source!r}")
    if not path.is_file():
        raise ValueError(f"mask: no such file {str(path)!r}")
    # the one array reader: a truncated, structured, datetime, object, empty or non-finite
    # file is a ValueError naming it (np.load's BadZipFile was an internal error, issue 29)
    try:
        with ArrayFile(path) as file:
            if not file.names:  # a .npy
                array = file.array()
            elif "mask" in file.names or len(file.names) == 1:
                array = file.array("mask" if "mask" in file.names else file.names[0])
            else:
                raise ValueError(f"mask: {str(path)!r} holds {file.names}; name the mask "
                                 "array 'mask'")
    except ArrayFileError as exc:
        raise ValueError(f"mask: {exc}") from None
    array = np.asarray(array)
    allowed = [tuple(spatial), (1, *spatial), tuple(shape)]
    if tuple(array.shape) not in allowed:
        raise ValueError(f"mask: expected shape {' or '.join(map(str, dict.fromkeys(allowed)))} "
                         f"for data of shape {shape}, given {tuple(array.shape)} in "
                         f"{str(path)!r}")
    numeric = np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)
    if array.dtype != np.bool_ and not (numeric and np.isin(array, (0, 1)).all()):
        raise ValueError(f"mask: expected 0/1 or boolean values (1 = kept) in {str(path)!r}")
    return torch.from_numpy(array.astype(bool))

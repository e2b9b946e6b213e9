"""Super-resolution: ``y = block_mean_k(x) + sigma_y * n``, ``(C, H, W) -> (C, H/k, W/k)``.

Each ``k x k`` block is averaged: ``A_block = 1^T / k^2 = (1/k) q^T`` with the unit vector
``q = 1 / k``. SVD (Kawar et al. 2022, app. A): per block, ``V`` is an orthogonal ``k^2 x k^2``
basis whose first vector is ``q`` (the rest spans the zero-mean patterns of the block), ``s = 1/k``
for every low-resolution pixel (``r = m = d / k^2``), ``U`` the identity. ``V^T x`` lists the
``q`` coordinates (``k`` times the block means) of all blocks in the order of ``y``, then the
other coordinates. ``A A^T = I / k^2``, so ``A^+ y`` is the nearest-neighbour upsampling of ``y``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.forward_models.base import (
    ForwardModel,
    IdentityMeasurementBasis,
    NoiseKind,
    Photons,
    SigmaY,
    image_shape,
)
from diffusers_kit.hookspecs import OptionError


class SuperResolution(IdentityMeasurementBasis, ForwardModel):
    """Super-resolution: the measurement is the image averaged over ``scale x scale`` blocks.

    Args:
        scale: the integer down-sampling factor ``k`` (it must divide the height and width).
    """

    def __init__(self, scale: Annotated[int, Field(ge=1, le=64)] = 2, sigma_y: SigmaY = 0.0,
                 noise: NoiseKind = "gaussian", photons: Photons = None, *,
                 data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        c, h, w = image_shape("super_resolution", self.data_shape)
        if h % scale or w % scale:
            raise OptionError("scale", f"a factor that divides the image height and width "
                              f"{h} x {w}", scale)
        self.scale = k = int(scale)
        self.measurement_shape = (c, h // k, w // k)
        # an orthogonal basis of R^(k^2) whose first column is 1 / k (QR of [1, I])
        seed = torch.eye(k * k, dtype=torch.float64)
        seed[:, 0] = 1.0
        basis, _ = torch.linalg.qr(seed)
        basis[:, 0] = basis[:, 0].abs()
        self.keep("basis", basis)
        self.keep("singulars", torch.full((self.m,), 1 / k, dtype=torch.float64))

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H/k, W/k, k^2)``."""
        b, (c, h, w), k = x.shape[0], self.measurement_shape, self.scale
        return x.reshape(b, c, h, k, w, k).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w, k * k)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "data")
        return self._blocks(x).mean(dim=-1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        k = self.scale
        return y.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) / (k * k)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``A^+ y = k^2 A^T y``: nearest-neighbour upsampling."""
        return self.A_adjoint(y) * (self.scale * self.scale)

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        coords = self._blocks(x) @ self.table("basis", x)  # (B, C, h, w, k^2)
        return coords.permute(0, 4, 1, 2, 3).reshape(b, self.d)

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")
        (c, h, w), k = self.measurement_shape, self.scale
        coords = z.reshape(b, k * k, c, h, w).permute(0, 2, 3, 4, 1)
        blocks = coords @ self.table("basis", z).T  # (B, C, h, w, k^2)
        return blocks.reshape(b, c, h, w, k, k).permute(0, 1, 2, 4, 3, 5).reshape(
            b, *self.data_shape)

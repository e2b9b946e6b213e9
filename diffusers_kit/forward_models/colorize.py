"""Colorization: ``y = mean_c x_c + sigma_y * n``, a gray image ``(1, H, W)`` from ``(3, H, W)``.

SVD through the orthonormal colour basis (Kawar et al. 2022, app. A; Song et al. 2021 used the
same decoupling for colorization): per pixel, ``e1 = (1, 1, 1) / sqrt(3)``,
``e2 = (1, -1, 0) / sqrt(2)``, ``e3 = (1, 1, -2) / sqrt(6)``. The gray value is
``<e1, x_pixel> / sqrt(3)``, so ``s = 1 / sqrt(3)`` for every pixel (``r = m = H*W``), ``U`` is
the identity and ``V^T x`` lists the ``e1`` coordinates of all pixels, then the ``e2``, then the
``e3`` ones. ``A A^T = I / 3``, so ``A^+ y`` copies the gray value into the three channels.
"""

from __future__ import annotations

import math

import torch

from diffusers_kit.forward_models.base import (
    ForwardModel,
    IdentityMeasurementBasis,
    NoiseKind,
    Photons,
    SigmaY,
    image_shape,
)


class Colorize(IdentityMeasurementBasis, ForwardModel):
    """Colorization: the measurement is the gray image, the mean of the three channels.

    Its parameters are the measurement noise's, described on :class:`ForwardModel`.
    """

    def __init__(self, sigma_y: SigmaY = 0.0, noise: NoiseKind = "gaussian",
                 photons: Photons = None, *, data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        _, h, w = image_shape("colorize", self.data_shape, channels=3)
        self.measurement_shape = (1, h, w)
        basis = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]],
                             dtype=torch.float64)
        self.keep("basis", basis / basis.norm(dim=1, keepdim=True))  # rows e1, e2, e3
        self.keep("singulars", torch.full((h * w,), 1 / math.sqrt(3), dtype=torch.float64))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "data")
        return x.mean(dim=1, keepdim=True)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        return (y / 3).expand(-1, 3, -1, -1).contiguous()

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``A^+ y = A^T (A A^T)^{-1} y``: the gray value in every channel."""
        self.check(y, self.measurement_shape, "a measurement")
        return y.expand(-1, 3, -1, -1).contiguous()

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return torch.einsum("jc,bchw->bjhw", self.table("basis", x), x).reshape(b, self.d)

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")
        coords = z.reshape(b, *self.data_shape)
        return torch.einsum("jc,bjhw->bchw", self.table("basis", z), coords)

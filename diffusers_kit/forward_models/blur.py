"""Gaussian deblurring: ``y = g * x + sigma_y * n``, a separable Gaussian blur, ``(C, H, W)``.

The kernel ``g_i ∝ exp(-(i - c)^2 / (2 sigma^2))``, ``i = 0 .. size-1``, ``c = size // 2``,
sums to 1. The boundary is **zero padding** with a same-size output, so each channel is blurred
by ``Y = K_H X K_W^T`` with the banded Toeplitz matrices ``K_n[i, j] = g[j - i + c]``
(``|j - i| <= c``): ``A = I_C ⊗ K_H ⊗ K_W``. Its SVD is exact and cheap (Kawar et al. 2022,
app. A): with ``K_n = U_n diag(s_n) V_n^T`` (``torch.linalg.svd`` of two small matrices, once),
``V^T x = V_H^T X V_W`` per channel, ``s[c, i, j] = s_H[i] s_W[j]`` (``r = m = d``; the values
are not sorted and the smallest can be tiny, so :meth:`pinv` cuts them off) and
``U z = U_H Z U_W^T``. The adjoint is the true one, ``K_H^T Y K_W``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.forward_models.base import ForwardModel, NoiseKind, Photons, SigmaY, image_shape
from diffusers_kit.hookspecs import OptionError


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """The normalised 1-D Gaussian of width ``size`` (odd), float64."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-offsets.square() / (2 * sigma * sigma))
    return kernel / kernel.sum()


def toeplitz(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(n, n)`` matrix of a same-size convolution with zero padding."""
    centre = kernel.numel() // 2
    index = torch.arange(n)
    offset = index[None, :] - index[:, None] + centre
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)],
                       torch.zeros((), dtype=kernel.dtype))


class GaussianBlur(ForwardModel):
    """Gaussian blur (separable, zero padding): the measurement is the blurred image.

    Args:
        sigma: standard deviation of the Gaussian, in pixels.
        size: kernel width, odd (default: ``2 * ceil(3 sigma) + 1``).
    """

    def __init__(self, sigma: Annotated[float, Field(gt=0, le=1000)] = 1.0,
                 size: Annotated[int, Field(ge=1, le=4095)] | None = None, sigma_y: SigmaY = 0.0,
                 noise: NoiseKind = "gaussian", photons: Photons = None, *,
                 data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        c, h, w = image_shape("blur", self.data_shape)
        if size is None:
            size = 2 * math.ceil(3 * sigma) + 1
        if size % 2 == 0:
            raise OptionError("size", "an odd kernel width", size)
        self.sigma, self.size = float(sigma), int(size)
        kernel = gaussian_kernel(self.sigma, self.size)
        self.keep("kernel", kernel)
        for axis, n in (("h", h), ("w", w)):
            matrix = toeplitz(kernel, n)
            u, s, vh = torch.linalg.svd(matrix)
            self.keep(f"K_{axis}", matrix)
            self.keep(f"U_{axis}", u)
            self.keep(f"s_{axis}", s)
            self.keep(f"Vt_{axis}", vh)
        grid = self.table("s_h")[:, None] * self.table("s_w")[None, :]
        self.keep("singulars", grid.expand(c, h, w).reshape(-1))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "data")
        return self.table("K_h", x) @ x @ self.table("K_w", x).T

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``K_H^T Y K_W`` per channel."""
        self.check(y, self.measurement_shape, "a measurement")
        return self.table("K_h", y).T @ y @ self.table("K_w", y)

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")  # V_H^T X V_W
        return (self.table("Vt_h", x) @ x @ self.table("Vt_w", x).T).reshape(b, self.d)

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")  # V_H Z V_W^T
        return self.table("Vt_h", z).T @ z.reshape(b, *self.data_shape) @ self.table("Vt_w", z)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        b = self.check(y, self.measurement_shape, "a measurement")  # U_H^T Y U_W
        return (self.table("U_h", y).T @ y @ self.table("U_w", y)).reshape(b, self.m)

    def U(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.m,), "spectral coordinates")  # U_H Z U_W^T
        return self.table("U_h", z) @ z.reshape(b, *self.measurement_shape) @ self.table("U_w", z).T

"""Denoising: ``y = x + sigma_y * n`` (``A`` is the identity; ``sigma_y > 0`` makes it a problem).

SVD: ``U = V = I`` (on flattened data), ``s = 1`` (``r = m = d``); ``A^+ = A^T = I``.
"""

from __future__ import annotations

import torch

from diffusers_kit.forward_models.base import ForwardModel, NoiseKind, Photons, SigmaY


class Denoise(ForwardModel):
    """Denoising: the measurement is the data itself, plus noise (any data shape).

    Its parameters are the measurement noise's, described on :class:`ForwardModel`.
    """

    def __init__(self, sigma_y: SigmaY = 0.0, noise: NoiseKind = "gaussian",
                 photons: Photons = None, *, data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        self.keep("singulars", torch.ones(self.d, dtype=torch.float64))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "data")
        return x.clone()

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        return y.clone()

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.A_adjoint(y)

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return x.reshape(b, self.d).clone()

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")
        return z.reshape(b, *self.data_shape).clone()

    Ut = Vt
    U = V

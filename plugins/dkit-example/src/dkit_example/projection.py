"""A forward model from a third party: one projection of an image (a one-angle tomograph).

``y[c, w] = sum_h x[c, h, w]``: each column of each channel summed, ``(C, H, W) -> (C, W)``.
An operator is one class: it subclasses ``diffusers_kit.forward_models.ForwardModel``, takes
``sigma_y`` and the keyword ``data_shape`` (the run graph supplies it), sets
``measurement_shape`` and implements ``A`` and its true adjoint ``A_adjoint`` (here: spread
each column sum back over the column). Without an SVD, ``pinv`` falls back on the dense matrix
(small data) and the methods that need the SVD (replacement, ΠGDM) say so; DPS only needs ``A``.
dkit's own tests check ⟨A x, y⟩ = ⟨x, Aᵀ y⟩ for every registered operator, this one included.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.forward_models.base import ForwardModel, image_shape


class ColumnSums(ForwardModel):
    """Column sums of each channel: a projection along the image's height.

    Args:
        sigma_y: standard deviation of the Gaussian measurement noise (data units).
    """

    def __init__(self, sigma_y: Annotated[float, Field(ge=0, le=100)] = 0.0, *,
                 data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape)
        c, _, w = image_shape("column_sums", self.data_shape)
        self.measurement_shape = (c, w)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "images")
        return x.sum(dim=2)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        return y[:, :, None, :].expand(-1, -1, self.data_shape[1], -1).contiguous()


__all__ = ["ColumnSums"]

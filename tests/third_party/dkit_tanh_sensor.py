"""A nonlinear sensor written as a third-party plugin would write it, for dkit's own tests
(tests/test_nonlinear_plugin.py installs it through an entry point).

``y = tanh(gain x) + sigma_y n`` elementwise: a saturating detector. It declares
``linear = False``, implements ``A`` (autograd differentiates it, which is all DPS needs) and a
right inverse ``pinv`` (``artanh(y) / gain``, clamped inside ``(-1, 1)``), and takes a nonzero
``sigma_y`` by default.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit import hookimpl
from diffusers_kit.forward_models.base import ForwardModel, SigmaY


class TanhSensor(ForwardModel):
    """A saturating detector: ``y = tanh(gain x) + sigma_y n``.

    Args:
        gain: the slope at 0.
        sigma_y: standard deviation of the Gaussian measurement noise (data units).
    """

    linear = False

    def __init__(self, gain: Annotated[float, Field(gt=0, le=100)] = 3.0,
                 sigma_y: SigmaY = 0.05, *, data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape)
        self.gain = gain

    def A(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, self.data_shape, "data")
        return torch.tanh(self.gain * x)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        edge = 1 - torch.finfo(y.dtype).eps
        return torch.atanh(y.clamp(-edge, edge)) / self.gain


@hookimpl
def dkit_register(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("forward_model", "tanh_sensor", TanhSensor)

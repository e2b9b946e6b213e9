"""Composition of forward models: ``y ~ p(y | outer(inner(x)))``, ``A = outer o inner``.

``A(x) = outer.A(inner.A(x))`` and, when both are linear, ``A^T = inner.A^T o outer.A^T``
(``<outer(inner x), y> = <inner x, outer^T y> = <x, inner^T outer^T y>``). The noise is the
outer operator's, applied once to the composed measurement; the inner one must be noiseless
(noise inside would reach ``y`` through ``outer``, correlated, which no noise model here
describes). The composition has no SVD (the factors' bases do not align in general): a linear
one takes its pseudo-inverse from the dense matrix (small data), a nonlinear one has none.
"""

from __future__ import annotations

import torch

from diffusers_kit.forward_models.base import ForwardModel


class Compose(ForwardModel):
    """``outer o inner``: measure ``inner``'s output with ``outer`` (see the module doc).

    Args:
        outer: the operator applied second; its noise is the composition's.
        inner: the operator applied first (noiseless); its measurement shape must be
            ``outer``'s data shape.
    """

    def __init__(self, outer: ForwardModel, inner: ForwardModel) -> None:
        if not (inner.noise.gaussian and inner.sigma_y == 0):
            raise ValueError(f"inner: {type(inner).__name__} has noise ({inner.noise.describe()});"
                             " the composition's noise is the outer operator's: make the inner "
                             "one noiseless")
        if tuple(outer.data_shape) != tuple(inner.measurement_shape):
            raise ValueError(f"outer: {type(outer).__name__} takes data of shape "
                             f"{tuple(outer.data_shape)}, but {type(inner).__name__} measures "
                             f"{tuple(inner.measurement_shape)}")
        super().__init__(data_shape=inner.data_shape)
        self.outer, self.inner = outer, inner
        self.measurement_shape = tuple(outer.measurement_shape)
        self.noise = outer.noise

    @property  # type: ignore[override]
    def linear(self) -> bool:
        return self.outer.linear and self.inner.linear

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer.A(self.inner.A(x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not self.linear:
            raise NotImplementedError(f"no adjoint: {self.lacks()}")
        return self.inner.A_adjoint(self.outer.A_adjoint(y))

    def describe(self) -> str:
        return (f"{type(self.outer).__name__} o {type(self.inner).__name__}: {self.data_shape} "
                f"-> {self.measurement_shape}, {self.noise.describe()}")


__all__ = ["Compose"]

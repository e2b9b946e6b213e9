"""A dense linear operator: ``y = M x + sigma_y * n`` on flattened data, for small data.

``M`` (``rows x d``) is read from a ``.npy`` file or drawn with ``seed`` as a Gaussian matrix
``M_ij ~ N(0, 1 / d)`` (compressed sensing's normalisation: ``E ||M x||^2 = (rows / d) ||x||^2``).
SVD: ``torch.linalg.svd(M)`` once, full matrices (Kawar et al. 2022's general case):
``r = min(rows, d)`` values, sorted, some possibly zero when ``M`` is rank-deficient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.forward_models.base import DENSE_LIMIT, ForwardModel, NoiseKind, Photons, SigmaY
from diffusers_kit.hookspecs import OptionError


class MatrixOperator(ForwardModel):
    """A dense matrix (given or random Gaussian) acting on the flattened data (d <= 4096).

    Args:
        rows: number of measurements of a random matrix (default: ``max(1, d // 2)``).
        path: a ``.npy`` file holding the ``(rows, d)`` matrix instead.
        seed: draws the random matrix.
    """

    def __init__(self, rows: Annotated[int, Field(ge=1, le=DENSE_LIMIT)] | None = None,
                 path: str | None = None, seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
                 sigma_y: SigmaY = 0.0, noise: NoiseKind = "gaussian", photons: Photons = None, *,
                 data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape, noise=noise, photons=photons)
        d = self.d
        if d > DENSE_LIMIT:
            raise ValueError(f"matrix is for small data (at most {DENSE_LIMIT} entries); this "
                             f"data set's examples have shape {self.data_shape} ({d} entries)")
        if path is not None and rows is not None:
            raise OptionError("rows", "null with path (give either rows, a random matrix, or "
                              "path, not both)", rows)
        if path is not None:
            matrix = torch.from_numpy(_load_matrix(path, d))
        else:
            rows = max(1, d // 2) if rows is None else int(rows)
            generator = torch.Generator().manual_seed(seed)
            matrix = torch.randn(rows, d, generator=generator, dtype=torch.float64) / d ** 0.5
        self.measurement_shape = (matrix.shape[0],)
        u, s, vh = torch.linalg.svd(matrix)
        self.keep("M", matrix)
        self.keep("U", u)
        self.keep("singulars", s)
        self.keep("Vt", vh)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return x.reshape(b, self.d) @ self.table("M", x).T

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        b = self.check(y, self.measurement_shape, "a measurement")
        return (y @ self.table("M", y)).reshape(b, *self.data_shape)

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.table("singulars", like)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        b = self.check(x, self.data_shape, "data")
        return x.reshape(b, self.d) @ self.table("Vt", x).T

    def V(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.d,), "spectral coordinates")
        return (z @ self.table("Vt", z)).reshape(b, *self.data_shape)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self.check(y, self.measurement_shape, "a measurement")
        return y @ self.table("U", y)

    def U(self, z: torch.Tensor) -> torch.Tensor:
        self.check(z, (self.m,), "spectral coordinates")
        return z @ self.table("U", z).T


def _load_matrix(source: str, d: int) -> np.ndarray:
    path = Path(source).expanduser()
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"path: expected an existing .npy file, given {source!r}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"path: cannot read {str(path)!r}: {exc}") from exc
    if array.ndim != 2 or array.shape[1] != d or not 1 <= array.shape[0] <= DENSE_LIMIT:
        raise ValueError(f"path: expected a (rows, {d}) matrix (rows <= {DENSE_LIMIT}) for data "
                         f"with {d} entries, given shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"path: expected a real matrix, given dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"path: the matrix in {str(path)!r} has non-finite entries")
    return array.astype(np.float64)

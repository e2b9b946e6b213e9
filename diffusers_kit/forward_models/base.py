"""Forward models (kind ``forward_model``): measurement operators ``y = A(x) + sigma_y * n``.

One protocol serves every inverse-problem method: the same object simulates the measurement
``y`` and computes every conditioning term (DPS, ΠGDM, DDRM, replacement), so the operator used
to measure is the operator used to restore.

**Shapes.** ``x`` is a batch ``(B, *data_shape)``, ``y`` a batch ``(B, *measurement_shape)``.
``d = prod(data_shape)``, ``m = prod(measurement_shape)``. Every method is batched, differentiable
(DPS back-propagates through ``A``) and runs on the input's device and dtype; the tables behind
an operator (masks, matrices, SVDs) are computed once at construction in float64 on the CPU and
moved lazily, once per (device, dtype).

**Noise.** ``y ~ p(y | A(x))``, a :class:`~diffusers_kit.forward_models.noise.NoiseModel`
(``noise``): by default Gaussian, ``y = A(x) + sigma_y * n`` with ``n ~ N(0, I_m)``, ``sigma_y``
in *data units* (the units of ``x``); ``noise: poisson`` counts ``photons`` and
``poisson_gaussian`` adds read noise ``sigma_y`` (:mod:`diffusers_kit.forward_models.noise`).

**Capabilities, declared.** ``linear`` (class attribute, default True) says whether ``A`` is
linear; ``has_svd``, ``has_adjoint`` and ``has_pinv`` follow from it and from the methods a
subclass implements. A nonlinear operator implements ``A`` only (autograd gives its
vector-Jacobian product, which is all DPS needs) and may offer ``pinv``, a right inverse with
``A(pinv(y)) == y`` on ``A``'s range; the linear-only methods (``A_adjoint``, the SVD,
``matrix``) refuse it with a message that says so, and so do the methods that need an SVD.

**SVD** (the convention of Kawar et al. 2022, DDRM, sec. 3 / app. A; also ΠGDM, Song et al.
2023). ``A = U diag(s) V^T`` with ``U`` (m×m) and ``V`` (d×d) orthogonal, applied as operators on
flattened vectors:

- ``Vt(x)``: ``(B, *data_shape) -> (B, d)``, the spectral coordinates ``V^T x``;
- ``V(z)``: ``(B, d) -> (B, *data_shape)``, with ``V(Vt(x)) == x`` and ``Vt(V(z)) == z``;
- ``Ut(y)``: ``(B, *measurement_shape) -> (B, m)``; ``U(z)``: ``(B, m) -> (B, *measurement_shape)``;
- ``singulars()``: ``s``, shape ``(r,)`` with ``r <= min(m, d)``, paired with the *first* ``r``
  coordinates of ``Vt(x)`` and of ``Ut(y)``. Every singular value of index ``>= r`` is exactly
  zero, so ``A(x) == U(pad_m(s * Vt(x)[:, :r]))`` where ``pad_m`` appends ``m - r`` zeros, and
  ``A_adjoint(y) == V(pad_d(s * Ut(y)[:, :r]))``. ``r = m`` exactly when the operator has full
  row rank by construction (inpaint: the kept pixels; colorize: ``H*W``; super-resolution:
  ``d / k^2``; blur and denoise: ``d``); ``matrix`` returns all ``min(m, d)`` values of
  ``torch.linalg.svd``. The values are >= 0, not necessarily sorted, and may be tiny (blur) or
  zero (a rank-deficient ``matrix``): treat them with a cutoff, as :meth:`pinv` does.

**Pseudo-inverse.** ``A^+ y = V(pad_d(s^+ * Ut(y)[:, :r]))`` with ``s_i^+ = 1 / s_i`` when
``s_i > rcond * max(s)`` and 0 otherwise; ``rcond`` is ``pinv_rcond`` when set, else
``max(m, d) * eps(dtype)`` (the rule of ``numpy.linalg.matrix_rank`` / ``torch.linalg.pinv``), so
``A(pinv(A(x))) == A(x)`` to working precision. Operators with a closed form override it.

A third-party operator subclasses :class:`ForwardModel`, takes ``sigma_y`` and a keyword
``data_shape`` (supplied by the run graph: ``dkit_context``), sets ``measurement_shape``, and
implements either the SVD (then ``A``, ``A_adjoint`` and ``pinv`` come for free) or ``A`` and
``A_adjoint`` (then ``pinv`` falls back on the dense matrix for small data), or, declaring
``linear = False``, ``A`` alone (and ``pinv`` if it has one).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.forward_models.noise import GaussianNoise, NoiseModel, noise_model
from diffusers_kit.hookspecs import OptionError

SigmaY = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
"""Standard deviation of the Gaussian measurement noise, in data units."""

NoiseKind = Literal["gaussian", "poisson", "poisson_gaussian"]
"""The measurement noise: Gaussian (``sigma_y``), Poisson (``photons``) or both."""

Photons = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)] | None
"""Expected photon count at the top of the data range (Poisson noise only)."""

DENSE_LIMIT = 4096
"""Largest ``d`` (and ``m``) for which a dense ``(m, d)`` matrix is built."""


class ForwardModel:
    """Base class of measurement operators ``y = A(x) + sigma_y * n`` (see the module doc).

    Subclasses set ``measurement_shape`` and register their tables with :meth:`keep`; the
    protocol methods are ``A``, ``A_adjoint``, ``pinv``, ``simulate``, ``singulars``, ``Vt``,
    ``V``, ``Ut``, ``U`` and the test helper ``matrix``; the capabilities ``linear``,
    ``has_svd``, ``has_adjoint``, ``has_pinv``; the noise model ``noise``.

    Args:
        sigma_y: measurement noise standard deviation, in data units (Gaussian noise,
            or the read noise of poisson_gaussian).
        noise: gaussian (default), poisson or poisson_gaussian.
        photons: expected photon count at the top of the data range (Poisson noise).
    """

    dkit_context = ("data_shape",)
    linear: bool = True
    """Whether ``A`` is linear (declared by the subclass; the default keeps every operator
    written before the declaration existed working as before)."""
    sigma_y: float = 0.0
    data_shape: tuple[int, ...]
    measurement_shape: tuple[int, ...]
    pinv_rcond: float | None = None
    """Relative cutoff of :meth:`pinv`; ``None``: ``max(m, d) * eps(dtype)``."""

    def __init__(self, sigma_y: float = 0.0, *, data_shape: tuple[int, ...],
                 noise: NoiseKind = "gaussian", photons: float | None = None) -> None:
        if data_shape is None:
            raise ValueError(f"{type(self).__name__} needs the data shape")
        shape = tuple(int(s) for s in data_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"data_shape must be a non-empty shape of positive sizes, given "
                             f"{tuple(data_shape)}")
        sigma_y = float(sigma_y)
        if not (math.isfinite(sigma_y) and sigma_y >= 0):
            raise OptionError("sigma_y", "a finite standard deviation >= 0 (data units)",
                              sigma_y)
        self.data_shape = shape
        self.measurement_shape = shape
        self._noise = noise_model(noise, sigma_y, photons)
        self.sigma_y = self._noise.sigma_y
        self._tables: dict[str, torch.Tensor] = {}
        self._moved: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # -- sizes -----------------------------------------------------------------------------
    @property
    def d(self) -> int:
        """Number of entries of one ``x``."""
        return math.prod(self.data_shape)

    @property
    def m(self) -> int:
        """Number of entries of one ``y``."""
        return math.prod(self.measurement_shape)

    # -- capabilities ----------------------------------------------------------------------
    @property
    def has_svd(self) -> bool:
        """Whether this operator implements the SVD (``singulars``, ``U``, ``V``...)."""
        return self.linear and type(self).singulars is not ForwardModel.singulars

    @property
    def has_adjoint(self) -> bool:
        """Whether ``A_adjoint`` exists: a linear operator implementing it or the SVD."""
        return self.linear and (type(self).A_adjoint is not ForwardModel.A_adjoint
                                or self.has_svd)

    @property
    def has_pinv(self) -> bool:
        """Whether ``pinv`` exists: a linear operator with an SVD or small enough for the
        dense matrix, or one (a nonlinear one included) that implements it."""
        if type(self).pinv is not ForwardModel.pinv:
            return True
        return self.linear and (self.has_svd or max(self.d, self.m) <= DENSE_LIMIT)

    def lacks(self) -> str:
        """Why this operator has no SVD (or no adjoint): for messages that name what is
        missing."""
        name = type(self).__name__
        if not self.linear:
            return f"{name} is nonlinear"
        if self.has_adjoint:
            return f"{name} implements A and its adjoint, not the SVD"
        return f"{name} implements neither A_adjoint nor the SVD"

    @property
    def noise(self) -> NoiseModel:
        """The measurement's noise model (:mod:`diffusers_kit.forward_models.noise`)."""
        noise = getattr(self, "_noise", None)
        if noise is None or (noise.gaussian and noise.sigma_y != self.sigma_y):
            noise = GaussianNoise(self.sigma_y)  # sigma_y set directly, as before noise models
            self._noise = noise
        return noise

    @noise.setter
    def noise(self, model: NoiseModel) -> None:
        self._noise = model
        self.sigma_y = model.sigma_y

    # -- tables: computed once, moved lazily -----------------------------------------------
    def keep(self, name: str, table: torch.Tensor) -> torch.Tensor:
        """Store a table (float64 or integer, on the CPU) for :meth:`table`."""
        table = table.detach().cpu()
        self._tables[name] = table
        self._moved = {k: v for k, v in self._moved.items() if k[0] != name}
        return table

    def table(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """Table ``name`` on ``like``'s device and (for floating tables) dtype; cached."""
        master = self._tables[name]
        if like is None:
            return master
        dtype = like.dtype if master.is_floating_point() else master.dtype
        key = (name, like.device, dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = master.to(device=like.device, dtype=dtype)
            self._moved[key] = moved
        return moved

    def check(self, x: torch.Tensor, shape: tuple[int, ...], what: str) -> int:
        """The batch size of ``x``, after checking that it is ``(B, *shape)``."""
        if tuple(x.shape[1:]) != tuple(shape) or x.dim() != len(shape) + 1:
            raise ValueError(f"{type(self).__name__}: expected {what} of shape (B, "
                             f"{', '.join(map(str, shape))}), given {tuple(x.shape)}")
        return x.shape[0]

    @staticmethod
    def pad(z: torch.Tensor, n: int) -> torch.Tensor:
        """``z`` ``(B, r)`` followed by ``n - r`` zeros: ``(B, n)``."""
        return torch.nn.functional.pad(z, (0, n - z.shape[1]))

    # -- the operator ----------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: ``(B, *data_shape) -> (B, *measurement_shape)``. Default: via the SVD."""
        z = self.Vt(x)
        s = self.singulars(like=z)
        return self.U(self.pad(s * z[:, : s.numel()], self.m))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The true adjoint ``A^T y`` (``<A x, y> = <x, A^T y>``). Default: via the SVD."""
        if not self.has_svd:
            raise NotImplementedError(f"no adjoint: {self.lacks()}" + (
                " (autograd gives its vector-Jacobian product)" if not self.linear else ""))
        z = self.Ut(y)
        s = self.singulars(like=z)
        return self.V(self.pad(s * z[:, : s.numel()], self.d))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Moore-Penrose pseudo-inverse ``A^+ y`` via the SVD, with the cutoff of the module
        doc; without an SVD, through the dense matrix (small data only). A nonlinear operator
        has none unless it implements one."""
        if not self.linear:
            raise NotImplementedError(f"{type(self).__name__} is nonlinear and implements no "
                                      "pinv")
        if not self.has_svd:
            self.check(y, self.measurement_shape, "a measurement")
            if "dense_pinv" not in self._tables:
                self.keep("dense_pinv", torch.linalg.pinv(self.matrix()))
            flat = y.reshape(y.shape[0], self.m) @ self.table("dense_pinv", y).T
            return flat.reshape(y.shape[0], *self.data_shape)
        z = self.Ut(y)
        s = self.singulars(like=z)
        rcond = self.pinv_rcond
        if rcond is None:
            rcond = max(self.m, self.d) * torch.finfo(z.dtype).eps
        largest = s.max() if s.numel() else s.new_zeros(())
        keep = s > rcond * largest
        inverse = torch.where(keep, 1 / torch.where(keep, s, torch.ones_like(s)),
                              torch.zeros_like(s))
        return self.V(self.pad(inverse * z[:, : s.numel()], self.d))

    def simulate(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A measurement ``y ~ p(y | A(x))`` from :attr:`noise` (Gaussian: ``A(x) + sigma_y
        n``), drawn with ``generator``, which must live on ``x``'s device."""
        return self.noise.sample(self.A(x), generator)

    # -- the SVD (optional) ----------------------------------------------------------------
    def _no_svd(self) -> NotImplementedError:
        return NotImplementedError(f"needs an SVD; {self.lacks()}")

    def singulars(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The singular values ``s``, shape ``(r,)``, ``r <= min(m, d)``; on ``like``'s device
        and dtype when given (else the float64 CPU table)."""
        raise self._no_svd()

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        """Spectral coordinates ``V^T x``: ``(B, *data_shape) -> (B, d)``."""
        raise self._no_svd()

    def V(self, z: torch.Tensor) -> torch.Tensor:
        """``V z``: ``(B, d) -> (B, *data_shape)``; ``V(Vt(x)) == x``."""
        raise self._no_svd()

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        """``U^T y``: ``(B, *measurement_shape) -> (B, m)``."""
        raise self._no_svd()

    def U(self, z: torch.Tensor) -> torch.Tensor:
        """``U z``: ``(B, m) -> (B, *measurement_shape)``."""
        raise self._no_svd()

    # -- for tests and small data ----------------------------------------------------------
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``(m, d)`` matrix of ``A``, built by applying ``A`` to the identity
        (small data only: ``d`` and ``m`` at most :data:`DENSE_LIMIT`)."""
        if not self.linear:
            raise ValueError(f"{type(self).__name__} is nonlinear: it has no matrix")
        if self.d > DENSE_LIMIT or self.m > DENSE_LIMIT:
            raise ValueError(f"{type(self).__name__}.matrix() is for small data (d, m <= "
                             f"{DENSE_LIMIT}); here d = {self.d}, m = {self.m}")
        eye = torch.eye(self.d, dtype=dtype).reshape(self.d, *self.data_shape)
        matrix = self.A(eye).reshape(self.d, self.m).T.contiguous()
        if not torch.isfinite(matrix).all():  # the SVD / pinv of it would fail anonymously
            bad = int((~torch.isfinite(matrix)).sum())
            raise ValueError(f"{type(self).__name__}.A returned {bad} non-finite values (NaN or "
                             f"inf) of {matrix.numel()} on the unit vectors; a linear operator "
                             "must map finite images to finite measurements")
        return matrix

    def describe(self) -> str:
        """One line for logs: the operator, its shapes and its noise."""
        return (f"{type(self).__name__}: {self.data_shape} -> {self.measurement_shape}, "
                f"{self.noise.describe()}")

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class IdentityMeasurementBasis:
    """For an operator whose SVD has ``U = I`` (the measurement's own coordinates are the
    spectral ones: inpainting's kept pixels, colorization's gray pixels, super-resolution's
    blocks): ``Ut`` flattens a measurement and ``U`` reshapes coordinates back. Put it before
    :class:`ForwardModel` among the bases."""

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        b = self.check(y, self.measurement_shape, "a measurement")  # type: ignore[attr-defined]
        return y.reshape(b, self.m)  # type: ignore[attr-defined]

    def U(self, z: torch.Tensor) -> torch.Tensor:
        b = self.check(z, (self.m,), "spectral coordinates")  # type: ignore[attr-defined]
        return z.reshape(b, *self.measurement_shape)  # type: ignore[attr-defined]


def image_shape(name: str, data_shape: tuple[int, ...], channels: int | None = None
                ) -> tuple[int, int, int]:
    """``(C, H, W)`` of image data, or a ValueError naming what ``name`` needs."""
    shape = tuple(int(s) for s in data_shape)
    if len(shape) != 3 or (channels is not None and shape[0] != channels):
        need = f"{channels}-channel images (C, H, W) with C = {channels}" if channels else \
            "images of shape (C, H, W)"
        raise ValueError(f"{name} needs {need}; this data set's examples have shape {shape}")
    c, h, w = shape
    return c, h, w

"""Forward models (kind ``forward_model``): the protocol's identities for every registered operator
(adjointness, SVD, orthogonality, pseudo-inverse, dense matrix, noise) and each family's formula
against an independent computation; bad input raises clear errors. The linear identities skip
an operator that declares ``linear = False`` (a plugin's): ``check_forward_model``'s nonlinear
branch covers it (tests/test_testing_kit.py, tests/test_nonlinear_plugin.py)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from diffusers_kit.forward_models import (
    Colorize,
    ForwardModel,
    GaussianBlur,
    Inpaint,
    MatrixOperator,
    SuperResolution,
)
from diffusers_kit.graph import Builder
from diffusers_kit.registry import get_registry

SHAPES = [(3, 8, 8), (1, 8, 8), (2,)]
# every registered operator with its defaults (plugins included), plus settings worth covering
EXTRA = [
    {"kind": "inpaint", "mask": "random", "rate": 0.3, "seed": 1},
    {"kind": "inpaint", "mask": "box", "seed": 3},
    {"kind": "inpaint", "mask": "box", "box_size": 0.25, "box_position": [0.0, 1.0]},
    {"kind": "inpaint", "mask": "half"},
    {"kind": "inpaint", "mask": "left"},
    {"kind": "super_resolution", "scale": 4},
    {"kind": "blur", "sigma": 2.0, "size": 5},
    {"kind": "matrix", "rows": 5, "seed": 2},
]
CONFIGS = [{"kind": c.name} for c in get_registry().components("forward_model")] + EXTRA
CASES = [(json.dumps(config), shape) for config in CONFIGS for shape in SHAPES]
IDS = [",".join(f"{k}={v}".replace(" ", "") for k, v in json.loads(c).items())
       + "-" + "x".join(map(str, s)) for c, s in CASES]
# the shapes each built-in accepts with its defaults (the rest must be refused with a ValueError)
ACCEPTS = {
    "inpaint": SHAPES, "denoise": SHAPES, "matrix": SHAPES,
    "colorize": [(3, 8, 8)], "super_resolution": [(3, 8, 8), (1, 8, 8)],
    "blur": [(3, 8, 8), (1, 8, 8)],
}


@functools.cache
def build(config: str, shape: tuple[int, ...]) -> ForwardModel | None:
    try:
        return get_registry().build("forward_model", json.loads(config), data_shape=shape)
    except ValueError:
        return None


def operator(config: str, shape: tuple[int, ...]) -> ForwardModel:
    op = build(config, shape)
    settings = json.loads(config)
    kind = settings.pop("kind")
    checked = kind in ACCEPTS and not set(settings) - {"sigma_y"}
    if op is None:
        assert not checked or shape not in ACCEPTS[kind], f"{kind} refused data of shape {shape}"
        pytest.skip(f"{kind} does not take data of shape {shape}")
    assert not checked or shape in ACCEPTS[kind], f"{kind} accepted data of shape {shape}"
    return op


def linear(op: ForwardModel) -> ForwardModel:
    """``op``, or a skip naming the capability it declares it lacks."""
    if not op.linear:
        pytest.skip(f"{type(op).__name__} declares linear = False: no adjoint, SVD or matrix")
    return op


def draws(op: ForwardModel, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *op.data_shape, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, *op.measurement_shape, generator=generator, dtype=torch.float64)
    return x, y


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() <= rtol * scale


def spectral(op: ForwardModel, z: torch.Tensor, n: int) -> torch.Tensor:
    s = op.singulars(like=z)
    return torch.nn.functional.pad(s * z[:, : s.numel()], (0, n - s.numel()))


# -- the protocol, for every registered operator -----------------------------------------------
@pytest.mark.parametrize(("config", "shape"), CASES, ids=IDS)
def test_protocol_identities(config, shape):
    op = operator(config, shape)
    x, y = draws(op)
    b = x.shape[0]
    ax = op.A(x)
    assert ax.shape == (b, *op.measurement_shape) and ax.dtype == torch.float64
    aty = linear(op).A_adjoint(y)
    assert aty.shape == x.shape

    # adjointness: <A x, y> = <x, A^T y>
    lhs, rhs = (ax * y).flatten(1).sum(1), (x * aty).flatten(1).sum(1)
    norms = ax.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert ((lhs - rhs).abs() <= 1e-10 * norms).all()

    if op.has_svd:  # an operator may give only A and its adjoint (DPS needs no more)
        # the SVD reconstructs A and A^T
        s = op.singulars()
        assert s.dim() == 1 and s.numel() <= min(op.m, op.d) and (s >= 0).all()
        assert close(op.U(spectral(op, op.Vt(x), op.m)), ax)
        assert close(op.V(spectral(op, op.Ut(y), op.d)), aty)

        # V and U are orthogonal
        z_d = torch.randn(b, op.d, dtype=torch.float64)
        z_m = torch.randn(b, op.m, dtype=torch.float64)
        assert op.Vt(x).shape == (b, op.d) and op.Ut(y).shape == (b, op.m)
        assert close(op.V(op.Vt(x)), x) and close(op.Vt(op.V(z_d)), z_d)
        assert close(op.U(op.Ut(y)), y) and close(op.Ut(op.U(z_m)), z_m)

    # the pseudo-inverse: A A^+ A = A, and it is the Moore-Penrose one
    assert close(op.A(op.pinv(ax)), ax, 1e-9)
    dense = op.matrix()
    assert dense.shape == (op.m, op.d)
    expected = y.reshape(b, op.m) @ torch.linalg.pinv(dense).T
    assert close(op.pinv(y).reshape(b, op.d), expected, 1e-8)

    # the dense matrix agrees with A and A^T
    assert close(x.reshape(b, op.d) @ dense.T, ax.reshape(b, op.m))
    assert close(y.reshape(b, op.m) @ dense, aty.reshape(b, op.d))
    # and its singular values are the operator's (zeros beyond r)
    if op.has_svd:
        s = op.singulars()
        full = torch.linalg.svdvals(dense)
        padded = torch.cat([s, s.new_zeros(full.numel() - s.numel())])
        assert close(torch.sort(padded, descending=True).values, full, 1e-9)


@pytest.mark.parametrize(("config", "shape"), CASES, ids=IDS)
def test_gradient_through_A_uses_the_adjoint(config, shape):
    """DPS differentiates ||y - A x||^2 through A: autograd must give -2 A^T (y - A x)."""
    op = linear(operator(config, shape))
    x, y = draws(op, seed=1)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad((y - op.A(x)).square().sum(), x)
    assert close(grad, -2 * op.A_adjoint(y - op.A(x.detach())))


@pytest.mark.parametrize(("config", "shape"), CASES, ids=IDS)
def test_float32_follows_the_input(config, shape):
    op = operator(config, shape)
    x, y = draws(op, seed=2)
    ax32 = op.A(x.float())
    assert ax32.dtype == torch.float32
    assert close(ax32.double(), op.A(x), 1e-5)
    if not op.linear:
        return
    assert close(op.A_adjoint(y.float()).double(), op.A_adjoint(y), 1e-5)
    if op.has_svd:
        assert op.singulars(like=ax32).dtype == torch.float32
        assert close(op.V(op.Vt(x.float())).double(), x, 1e-5)


@pytest.mark.parametrize(("config", "shape"), CASES, ids=IDS)
def test_simulate_adds_gaussian_noise_of_std_sigma_y(config, shape):
    noisy = json.dumps({**json.loads(config), "sigma_y": 0.3})
    op = operator(noisy, shape)
    assert op.sigma_y == 0.3
    batch = max(2, math.ceil(20000 / op.m))  # >= 20000 noise draws: the std is known to ~0.5%
    x = torch.randn(batch, *op.data_shape, dtype=torch.float64)
    y = op.simulate(x, generator=torch.Generator().manual_seed(0))
    noise = (y - op.A(x)).flatten()
    assert abs(noise.std().item() / 0.3 - 1) < 0.04
    assert abs(noise.mean().item()) < 5 * 0.3 / noise.numel() ** 0.5
    again = op.simulate(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, again)

    clean = operator(config, shape)  # with its defaults: noiseless for every built-in
    if json.loads(config)["kind"] in ACCEPTS:
        assert clean.sigma_y == 0.0
    if clean.noise.gaussian and clean.sigma_y == 0:
        assert torch.equal(clean.simulate(x[:4]), clean.A(x[:4]))


def test_every_builtin_operator_is_registered():
    names = {c.name for c in get_registry().components("forward_model")}
    assert set(ACCEPTS) <= names


# -- each family against an independent computation --------------------------------------------
def test_inpaint_measures_the_kept_pixels_of_every_channel():
    op = Inpaint(data_shape=(3, 8, 8))  # centre hole of half the side
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[2:6, 2:6] = True
    assert torch.equal(op.mask, (~hole).expand(3, 8, 8))
    assert op.measurement_shape == (3 * 48,)
    x, _ = draws(op)
    assert torch.equal(op.A(x), x[:, op.mask])
    assert torch.equal(op.A_adjoint(op.A(x)), x * op.mask)
    assert torch.equal(op.pinv(op.A(x)), x * op.mask)

    random = Inpaint(mask="random", rate=0.25, seed=5, data_shape=(2, 8, 8))
    assert random.measurement_shape == (2 * 16,)
    assert torch.equal(random.mask[0], random.mask[1])
    assert not torch.equal(random.mask, Inpaint(mask="random", rate=0.25, seed=6,
                                                data_shape=(2, 8, 8)).mask)
    box = Inpaint(mask="box", box_size=0.25, box_position=[1.0, 0.0], data_shape=(1, 8, 8))
    assert not box.mask[0, 6:, :2].any() and box.mask.sum() == 60


def test_inpaint_on_vectors_half_and_left():
    half = Inpaint(mask="half", data_shape=(2,))  # the second coordinate is missing
    left = Inpaint(mask="left", data_shape=(2,))  # the first coordinate is missing
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert torch.equal(half.A(x), x[:, :1]) and torch.equal(left.A(x), x[:, 1:])
    image = Inpaint(mask="half", data_shape=(1, 4, 4))
    assert image.mask[0, :2].all() and not image.mask[0, 2:].any()
    image = Inpaint(mask="left", data_shape=(1, 4, 4))
    assert not image.mask[0, :, :2].any() and image.mask[0, :, 2:].all()


def test_inpaint_mask_files(tmp_path):
    mask = np.ones((8, 8), dtype=np.uint8)
    mask[:3] = 0
    np.save(tmp_path / "mask.npy", mask)
    np.savez(tmp_path / "mask.npz", mask=mask.astype(bool), other=np.zeros(3))
    for name in ("mask.npy", "mask.npz"):
        op = Inpaint(mask=str(tmp_path / name), data_shape=(3, 8, 8))
        assert torch.equal(op.mask, torch.from_numpy(mask.astype(bool)).expand(3, 8, 8))

    np.save(tmp_path / "small.npy", np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 8\).*given \(4, 4\)"):
        Inpaint(mask=str(tmp_path / "small.npy"), data_shape=(3, 8, 8))
    np.save(tmp_path / "grey.npy", np.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="0/1"):
        Inpaint(mask=str(tmp_path / "grey.npy"), data_shape=(3, 8, 8))
    np.save(tmp_path / "none.npy", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="this one keeps none"):
        Inpaint(mask=str(tmp_path / "none.npy"), data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="no such file"):
        Inpaint(mask=str(tmp_path / "absent.npy"), data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="box, random, half, left, center"):
        Inpaint(mask="circle", data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="box_position"):
        Inpaint(mask="center", box_position=[0.5, 0.5], data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="box_position: expected 2"):
        Inpaint(mask="box", box_position=[0.5], data_shape=(3, 8, 8))


def test_colorize_is_the_channel_mean_and_its_basis_is_orthonormal():
    op = Colorize(data_shape=(3, 4, 5))
    x, y = draws(op)
    assert torch.allclose(op.A(x), x.mean(1, keepdim=True))
    assert torch.allclose(op.pinv(y), y.expand(-1, 3, -1, -1))
    assert torch.allclose(op.singulars(), torch.full((20,), 3 ** -0.5, dtype=torch.float64))
    basis = op.table("basis")
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(basis[0], torch.full((3,), 3 ** -0.5, dtype=torch.float64))


def test_super_resolution_is_the_block_mean():
    op = SuperResolution(scale=4, data_shape=(2, 8, 12))
    assert op.measurement_shape == (2, 2, 3)
    x, y = draws(op)
    assert torch.allclose(op.A(x), torch.nn.functional.avg_pool2d(x, 4))
    upsampled = torch.nn.functional.interpolate(y, scale_factor=4, mode="nearest")
    assert torch.allclose(op.pinv(y), upsampled)
    assert torch.allclose(op.singulars(), torch.full((12,), 0.25, dtype=torch.float64))


def test_blur_is_a_zero_padded_gaussian_convolution():
    op = GaussianBlur(sigma=1.5, size=7, data_shape=(2, 9, 6))
    x, _ = draws(op)
    offsets = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    expected = torch.nn.functional.conv2d(x.reshape(-1, 1, 9, 6), kernel, padding=3)
    assert torch.allclose(op.A(x), expected.reshape(x.shape))
    assert GaussianBlur(sigma=1.0, data_shape=(1, 8, 8)).size == 7  # 2 ceil(3 sigma) + 1
    with pytest.raises(ValueError, match="size: expected an odd"):
        GaussianBlur(size=4, data_shape=(1, 8, 8))


def test_matrix_random_and_from_a_file(tmp_path):
    op = MatrixOperator(data_shape=(3, 2, 2))
    assert op.measurement_shape == (6,)
    dense = op.table("M")
    assert torch.equal(op.matrix(), dense)
    again = MatrixOperator(data_shape=(3, 2, 2))
    assert torch.equal(again.table("M"), dense)  # the seed fixes it
    given = np.arange(10.0).reshape(2, 5)
    np.save(tmp_path / "A.npy", given)
    op = MatrixOperator(path=str(tmp_path / "A.npy"), data_shape=(5,))
    assert torch.equal(op.matrix(), torch.from_numpy(given))
    assert op.singulars().numel() == 2
    with pytest.raises(ValueError, match=r"path: expected a \(rows, 4\) matrix"):
        MatrixOperator(path=str(tmp_path / "A.npy"), data_shape=(4,))
    with pytest.raises(ValueError, match="either rows"):
        MatrixOperator(rows=2, path=str(tmp_path / "A.npy"), data_shape=(5,))
    with pytest.raises(ValueError, match="small data"):
        MatrixOperator(data_shape=(3, 64, 64))


# -- bad input ----------------------------------------------------------------------------------
def test_operators_refuse_data_they_do_not_fit():
    with pytest.raises(ValueError, match="3-channel images"):
        Colorize(data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"scale: expected a factor that divides.* 8 x 8, given 3"):
        SuperResolution(scale=3, data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"images of shape \(C, H, W\)"):
        GaussianBlur(data_shape=(2,))
    op = Inpaint(data_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"expected data of shape \(B, 3, 8, 8\)"):
        op.A(torch.zeros(2, 3, 4, 4))


def test_negative_sigma_y_is_refused():
    with pytest.raises(ValueError, match="sigma_y"):
        Inpaint(sigma_y=-0.1, data_shape=(3, 8, 8))
    for component in get_registry().components("forward_model"):
        with pytest.raises(ValueError, match="sigma_y"):  # pydantic's ValidationError
            get_registry().build("forward_model", {"kind": component.name, "sigma_y": -1.0},
                                 data_shape=(3, 8, 8))


def test_spec_errors_name_the_field():
    builder = Builder(get_registry(), None)
    cases = [  # a refusal of one option (an OptionError) is on that option's field
        ({"kind": "colorize"}, (1, 8, 8), "3-channel", ""),
        ({"kind": "super_resolution", "scale": 3}, (3, 8, 8), "divides the image height",
         ".scale"),
        ({"kind": "inpaint", "sigma_y": -1}, (3, 8, 8), "sigma_y", ""),
        ({"kind": "inpaint", "mask": "circle"}, (3, 8, 8), "mask", ""),
    ]
    for config, shape, word, option in cases:
        assert builder.build(("restore", "operator"), "forward_model", config,
                             data_shape=shape) is None
        issue = builder.issues[-1]
        assert issue.field == f"restore.operator{option}" and word in issue.expected


def test_a_plugin_operator_needs_only_A_and_its_adjoint_or_only_the_svd():
    """What the base class derives: pinv from the dense matrix (no SVD), or A, A^T and pinv
    from the SVD."""

    class Scale(ForwardModel):  # A = diag(1, 2, 0), no SVD
        def A(self, x):
            return x * self.table("w", x)

        A_adjoint = A

    class SpectralScale(ForwardModel):  # the same operator, given only by its SVD
        def singulars(self, like=None):
            return self.table("w", like)[:2]

        def Vt(self, x):
            return x

        V = Ut = U = Vt

    for cls in (Scale, SpectralScale):
        op = cls(data_shape=(3,))
        op.keep("w", torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
        assert op.has_svd is (cls is SpectralScale)
        x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
        assert torch.allclose(op.A(x), torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64))
        assert torch.allclose(op.A_adjoint(x), op.A(x))
        assert torch.allclose(op.pinv(x), torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="SVD"):
        Scale(data_shape=(3,)).Vt(x)


# -- composition ------------------------------------------------------------------------------
def test_composition_is_the_product_with_its_adjoint_and_the_outer_noise():
    """``blur o colorize``: the dense matrix is the product of the factors' matrices, the adjoint
    identity holds (the kit), the noise is the outer operator's, and a noisy inner operator or
    mismatched shapes are refused."""
    from diffusers_kit.forward_models import Compose, Denoise
    from diffusers_kit.testing import check_forward_model

    inner = Colorize(data_shape=(3, 4, 4))
    outer = GaussianBlur(sigma=1.0, size=3, sigma_y=0.1, data_shape=(1, 4, 4))
    op = Compose(outer, inner)
    assert op.linear and op.has_adjoint and not op.has_svd and op.has_pinv
    assert op.measurement_shape == (1, 4, 4) and op.sigma_y == 0.1 and op.noise is outer.noise
    assert close(op.matrix(), outer.matrix() @ inner.matrix())
    x, y = draws(op)
    lhs, rhs = (op.A(x) * y).sum(), (x * op.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * float(op.A(x).norm() * y.norm())
    check_forward_model(op)  # adjoint, A A^+ A = A, VJP, noise of std 0.1
    with pytest.raises(ValueError, match="inner: Colorize has noise"):
        Compose(outer, Colorize(sigma_y=0.1, data_shape=(3, 4, 4)))
    with pytest.raises(ValueError, match=r"outer: Denoise takes data of shape \(3, 4, 4\)"):
        Compose(Denoise(data_shape=(3, 4, 4)), inner)


def test_a_composition_with_a_nonlinear_factor_is_nonlinear():
    """A saturating sensor after a blur: nonlinear, so no adjoint and no pinv; autograd's
    derivative through both factors is checked by the kit."""
    import sys
    from pathlib import Path

    from diffusers_kit.forward_models import Compose
    from diffusers_kit.testing import check_forward_model

    sys.path.insert(0, str(Path(__file__).parent / "third_party"))
    try:
        from dkit_tanh_sensor import TanhSensor
    finally:
        sys.path.pop(0)
    op = Compose(TanhSensor(sigma_y=0.02, data_shape=(1, 6, 6)),
                 GaussianBlur(sigma=1.0, size=3, data_shape=(1, 6, 6)))
    assert not op.linear and not op.has_adjoint and not op.has_pinv
    with pytest.raises(NotImplementedError, match="Compose is nonlinear"):
        op.A_adjoint(torch.zeros(1, 1, 6, 6))
    check_forward_model(op)


def test_an_operator_returning_nan_is_named_instead_of_failing_in_the_svd():
    # issue 29: a plugin operator returning NaN crashed in torch.linalg.pinv (LinAlgError), an
    # internal error that named no operator
    class Leaky(ForwardModel):  # linear, A only: pinv goes through the dense matrix
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.measurement_shape = self.data_shape

        def A(self, x):
            out = x.clone()
            out[:, 1] = float("nan")
            return out

    op = Leaky(data_shape=(3,))
    with pytest.raises(ValueError, match=r"Leaky\.A returned 3 non-finite values .* of 9"):
        op.pinv(torch.zeros(2, 3))

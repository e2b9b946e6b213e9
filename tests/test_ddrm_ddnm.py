"""DDRM and DDNM against closed forms on an isotropic Gaussian prior ``N(mu, 0.8^2 I)``.

On this prior the exact denoiser is affine, ``x0_hat = mu + c^2 / (c^2 + sigma^2) (x/alpha -
mu)`` in the variance-exploding units DDRM works in, and the spectral directions of ``A`` are
independent; so DDRM's output along each direction is Gaussian with a mean and variance that
a scalar recursion through the paper's three kernels gives exactly (:func:`ddrm_law`, written
here from eqs. 7-8, independent of the tensor code in the SVD basis). The samples of the
implementation must match it within Monte-Carlo error, and the recursion is compared with the
exact posterior: DDRM is biased there (docs/inverse.md states by how much; the figures are
kept here within 0.005), except without measurement noise at ``eta = 0``, where it is DDIM on
the null space and the measurement on the rest. DDNM without noise is exact (the sampled law
is read without sampling noise from Heun being affine in ``x_T``, as in test_inverse.py), also
for an operator with no SVD.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.guidance import DDNM, DDRM, Replacement
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import VP
from diffusers_kit.solvers import DDIM, HeunODE
from tests.gaussian_mixture import ExactScoreNetwork, GaussianPosterior
from tests.test_inverse import ISOTROPIC, TRUTH, operator

C = 0.8  # the prior's standard deviation (ISOTROPIC)
N = 20_000
STEPS = 20  # the paper's number of steps


def matrix(rows, tmp_path, sigma_y):  # type: ignore[no-untyped-def]
    path = tmp_path / "A.npy"
    np.save(path, np.array(rows, dtype=np.float64))
    return operator("matrix", path=str(path), sigma_y=sigma_y)


OPERATORS = {
    "tests' matrix": lambda tmp: operator("matrix", rows=1, seed=0, sigma_y=0.2),
    "[[2, 0.5]]": lambda tmp: matrix([[2.0, 0.5]], tmp, 0.2),
    "[[0.5, 0.1]]": lambda tmp: matrix([[0.5, 0.1]], tmp, 0.2),
    "inpaint, sigma_y 0.1": lambda tmp: operator("inpaint", mask="half", sigma_y=0.1),
}


def directions(forward):  # type: ignore[no-untyped-def]
    """A's one row direction ``u`` (singular value ``s``), the null direction, the measured
    ``y`` (of TRUTH, noiseless) and ``y_bar = (U^T y) / s``, by torch's own SVD."""
    A = forward.matrix()
    y = forward.A(TRUTH[None].double())[0]
    U, S, Vh = torch.linalg.svd(A)
    s = float(S[0])
    return Vh[0], Vh[1], s, y, float(U[:, 0] @ y) / s


def ddrm_law(s: float, y_bar: float, mu: float, sigma_y: float, eta: float, eta_b, steps: int
             ) -> tuple[float, float]:
    """Mean and variance of DDRM's output along one spectral direction (singular value ``s``;
    0: the null space) on the prior ``N(mu, C^2)`` there, from DDIM's start ``x_T ~ N(0, 1)``
    on VP's grid of ``steps``: each move is ``x_s = a x_t + b + sqrt(w) z`` in VE units."""
    rows = DDIM(steps=steps).cached_grid(VP()).table.rows
    m, v = 0.0, 1.0 / rows["alpha_t"][0] ** 2  # x_T / alpha_T
    for i in range(len(rows["alpha_t"])):
        now = rows["sigma_t"][i] / rows["alpha_t"][i]
        to = rows["sigma_s"][i] / rows["alpha_s"][i]
        k = C**2 / (C**2 + now**2)  # x0_hat = k x + (1 - k) mu
        keep = math.sqrt(1 - eta**2)
        if s == 0:  # x0_hat + keep to eps_hat + eta to z, eps_hat = (x - x0_hat) / now
            a = k + keep * to / now * (1 - k)
            b, w = (1 - a) * mu, (eta * to) ** 2
        elif s * to < sigma_y:  # x0_hat + keep to (y_bar - x0_hat) / (sigma_y / s) + eta to z
            g = keep * to * s / sigma_y
            a, b, w = (1 - g) * k, (1 - g) * (1 - k) * mu + g * y_bar, (eta * to) ** 2
        else:  # (1 - eta_b) x0_hat + eta_b y_bar + sqrt(to^2 - eta_b^2 sigma_y^2 / s^2) z
            weight = eta_b if eta_b != "ddpm" else 2 * to**2 / (to**2 + (sigma_y / s) ** 2)
            a = (1 - weight) * k
            b = (1 - weight) * (1 - k) * mu + weight * y_bar
            w = max(to**2 - (weight * sigma_y / s) ** 2, 0.0)
        m, v = a * m + b, a * a * v + w
    return m, v


def ddrm_samples(forward, term, steps: int = STEPS, n: int = N):  # type: ignore[no-untyped-def]
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    y = forward.A(TRUTH[None].double()).float()
    view = model.guided([term], None, y.expand(n, *y.shape[1:]))
    return DDIM(steps=steps).sample(view, (n, 2), generator=torch.Generator().manual_seed(5)
                                    ).samples.double()


SETTINGS = {"paper": (0.85, 1.0), "ddpm": (1.0, "ddpm"), "eta 0": (0.0, 1.0)}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("operator_name", list(OPERATORS))
def test_ddrm_samples_the_law_of_its_kernels(operator_name, setting, tmp_path):
    """The implementation (SVD basis, cases, VE units, DDIM's grid and noise) against the
    scalar recursion, along the row and the null direction: means within 4 standard errors,
    variances within 4 standard errors of a variance (``sqrt(2 / N)``, 1 %)."""
    forward = OPERATORS[operator_name](tmp_path)
    eta, eta_b = SETTINGS[setting]
    samples = ddrm_samples(forward, DDRM(forward, eta=eta, eta_b=eta_b))
    u, null, s, _, y_bar = directions(forward)
    mu = ISOTROPIC.means[0].double()
    for direction, singular in ((u, s), (null, 0.0)):
        m, v = ddrm_law(singular, y_bar, float(direction @ mu), forward.sigma_y, eta, eta_b,
                        STEPS)
        along = samples @ direction
        label = (f"{operator_name} / {setting} / s = {singular:.2f}: mean {float(along.mean()):.4f}"
                 f" vs {m:.4f}, variance {float(along.var()):.5f} vs {v:.5f}")
        assert abs(float(along.mean()) - m) < 4 * math.sqrt(v / N) + 1e-6, label
        assert abs(float(along.var()) / v - 1) < 4 * math.sqrt(2 / N), label


# DDRM's law over the exact posterior (20 steps): along A's row, variance ratio and mean error
# in posterior standard deviations; the null direction's variance ratio (its mean is exact)
BIAS = {
    ("tests' matrix", "paper"): (0.057, +0.003, 0.614),
    ("tests' matrix", "ddpm"): (0.006, +0.001, 0.402),
    ("tests' matrix", "eta 0"): (0.051, +0.000, 0.805),
    ("[[2, 0.5]]", "paper"): (2.174, +0.214, 0.614),
    ("[[2, 0.5]]", "ddpm"): (6.535, +0.021, 0.402),
    ("[[2, 0.5]]", "eta 0"): (1.937, +0.197, 0.805),
    ("[[0.5, 0.1]]", "paper"): (0.485, +0.121, 0.614),
    ("[[0.5, 0.1]]", "ddpm"): (0.997, +0.356, 0.402),
    ("[[0.5, 0.1]]", "eta 0"): (0.001, -0.086, 0.805),
    ("inpaint, sigma_y 0.1", "paper"): (2.007, -0.167, 0.614),
    ("inpaint, sigma_y 0.1", "ddpm"): (5.606, -0.017, 0.402),
    ("inpaint, sigma_y 0.1", "eta 0"): (1.795, -0.154, 0.805),
}


def test_ddrm_is_biased_on_a_gaussian_prior_by_the_stated_amounts(tmp_path):
    """The recursion's law against the exact posterior (no sampling noise): the figures of
    docs/inverse.md within 0.005. The null direction is DDRM's ``eta``-sampler on the prior
    itself, which keeps ``x0_hat`` (the posterior mean) where the posterior of ``x_0`` belongs
    and loses variance at every step: it keeps 0.40 of it at ``eta = 1`` and 0.61 at 0.85 in
    20 steps, and 1/2 and 0.76 in the limit of fine grids (DDIM's own
    discretisation, ``eta = 0``, keeps 0.805 at 20 steps and tends to all). Along measured
    directions the spread is too narrow or too wide by up to 20x or 6.5x."""
    for (operator_name, setting), (ratio, mean_error, null_ratio) in BIAS.items():
        forward = OPERATORS[operator_name](tmp_path)
        eta, eta_b = SETTINGS[setting]
        u, null, s, y, y_bar = directions(forward)
        mu = ISOTROPIC.means[0].double()
        posterior = GaussianPosterior(ISOTROPIC, forward.matrix(), y, forward.sigma_y)
        v = float(u @ posterior.covs[0] @ u)
        m, var = ddrm_law(s, y_bar, float(u @ mu), forward.sigma_y, eta, eta_b, STEPS)
        got = (var / v, (m - float(u @ posterior.means[0])) / math.sqrt(v))
        m0, var0 = ddrm_law(0.0, 0.0, float(null @ mu), forward.sigma_y, eta, eta_b, STEPS)
        label = (f"{operator_name} / {setting}: {got[0]:.3f} / {got[1]:+.3f} / "
                 f"{var0 / C**2:.3f}")
        assert abs(got[0] - ratio) < 0.005 * (1 + ratio), label
        assert abs(got[1] - mean_error) < 0.005, label
        assert abs(var0 / C**2 - null_ratio) < 0.005, label
        assert abs(m0 - float(null @ mu)) / C < 0.005, label
    # a finer grid does not remove it: the share kept tends to eta^2 / (2 (1 - sqrt(1 -
    # eta^2))), the fixed point of a move x_s = x0_hat + a (x_t - x0_hat) + eta sigma z with
    # a = sqrt(1 - eta^2) at small noise (1/2 at eta = 1, 0.763 at 0.85); DDIM (eta = 0)
    # converges to the exact variance
    for eta, steps, expected in ((1.0, 100, 0.466), (1.0, 1000, 0.493), (0.85, 100, 0.719),
                                 (0.85, 1000, 0.754), (0.0, 1000, 0.996)):
        got = ddrm_law(0.0, 0.0, 0.0, 0.2, eta, 1.0, steps)[1] / C**2
        assert abs(got - expected) < 0.005, (eta, steps, got)
    for eta in (1.0, 0.85):
        limit = eta**2 / (2 * (1 - math.sqrt(1 - eta**2)))
        assert abs(ddrm_law(0.0, 0.0, 0.0, 0.2, eta, 1.0, 5000)[1] / C**2 - limit) < 0.005


def test_ddrm_without_noise_at_eta_0_is_exact():
    """Noiseless, ``eta = 0``, ``eta_b = 1``: the measured directions land on ``y_bar`` (A x = y
    to working precision) and the null space is DDIM on the prior, which is the exact
    posterior's there in the limit of steps: the samples match DDNM with DDIM (the exact
    method of the next tests) within Monte-Carlo error, and the recursion's 0.98 at 200
    steps."""
    forward = operator("matrix", rows=1, seed=0)
    _, null, _, y, _ = directions(forward)
    ddrm = ddrm_samples(forward, DDRM(forward, eta=0.0, eta_b=1.0), steps=200, n=8000)
    ddnm = ddrm_samples(forward, DDNM(forward), steps=200, n=8000)
    assert float((forward.A(ddrm) - y).abs().max()) < 1e-5
    mean, var = ddrm_law(0.0, 0.0, float(null @ ISOTROPIC.means[0].double()), 0.0, 0.0, 1.0, 200)
    assert var / C**2 > 0.975
    for samples in (ddrm, ddnm):
        along = samples @ null
        assert abs(float(along.var()) / var - 1) < 4 * math.sqrt(2 / 8000)
        assert abs(float(along.mean()) - mean) < 4 * math.sqrt(var / 8000)


def test_ddrm_refuses_what_it_cannot_do(tmp_path):
    """Another solver, ``eta_b: ddpm`` without noise, an operator without an SVD."""
    forward = OPERATORS["tests' matrix"](tmp_path)
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    view = model.guided([DDRM(forward)], None, torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"DDRM takes the sampler's steps itself.*ddim"):
        HeunODE(steps=4).sample(view, (4, 2))
    from diffusers_kit.guidance import DDNMPlus

    two = model.guided([DDRM(forward), DDNMPlus(forward)], None, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="one guidance term at most may take"):
        DDIM(steps=4).sample(two, (4, 2))
    with pytest.raises(ValueError, match="eta_b: 'ddpm' needs measurement noise"):
        DDRM(operator("matrix", rows=1, seed=0), eta_b="ddpm")
    reason = DDRM(AdjointOnly(sigma_y=0.1, data_shape=(2,))).check(model)
    assert reason is not None and "an operator with an SVD" in reason and "AdjointOnly" in reason


class AdjointOnly(ForwardModel):
    """``A = [[0.6, -0.8]]`` by ``A`` and its adjoint only: no SVD (DDNM takes ``A^+`` from
    the dense matrix)."""

    def __init__(self, sigma_y: float = 0.0, *, data_shape: tuple[int, ...]) -> None:
        super().__init__(sigma_y, data_shape=data_shape)
        self.measurement_shape = (1,)
        self.row = torch.tensor([0.6, -0.8], dtype=torch.float64)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.row.to(x.dtype)).sum(1, keepdim=True)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.row.to(y.dtype)


def affine_law(forward, term):  # type: ignore[no-untyped-def]
    """The exact law of Heun's 160 steps with ``term`` (affine in ``x_T`` here), from three
    deterministic runs (a fourth checks the affinity): its mean ``b`` and covariance
    ``M M^T``, and the measurement ``y`` of TRUTH."""
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    x_T = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, -1.3]], dtype=torch.float64)
    y = forward.A(TRUTH[None].double())
    out = HeunODE(steps=160).sample(model.guided([term], None, y.expand(4, -1)), (4, 2),
                                    x_T=x_T).samples.double()
    M = (out[1:3] - out[0]).T
    assert torch.allclose(out[3], out[0] + M @ x_T[3], atol=1e-5), "not affine in x_T"
    return out, out[0], M @ M.T, y


@pytest.mark.parametrize("name", ["matrix", "inpaint", "no SVD"])
def test_ddnm_without_noise_is_exact(name):
    """``A x = y`` to working precision and, in A's null space, the exact posterior's law
    (the prior's there): variance within 1 % (Heun's final Tweedie step leaves 0.4 % less) and
    mean within 0.01 prior std. An operator with only ``A`` and its adjoint works too (the
    SVD methods refuse it)."""
    forward = {"matrix": lambda: operator("matrix", rows=1, seed=0),
               "inpaint": lambda: operator("inpaint", mask="half"),
               "no SVD": lambda: AdjointOnly(data_shape=(2,))}[name]()
    out, mean, cov, y = affine_law(forward, DDNM(forward))
    assert float((forward.A(out) - y).abs().max()) < 1e-6
    A = forward.matrix()
    u = A[0] / A[0].norm()
    null = torch.stack([-u[1], u[0]])
    ratio = float(null @ cov @ null) / C**2
    error = float(null @ (mean - ISOTROPIC.means[0].double())) / C
    assert abs(ratio - 1) < 0.01 and abs(error) < 0.01, f"{name}: {ratio:.4f}, {error:+.4f}"
    assert abs(float(u @ cov @ u)) < 1e-9  # the measured direction is fixed: y
    if name == "no SVD":
        process = VP()
        reason = Replacement(forward).check(ScoreModel(process, ExactScoreNetwork(ISOTROPIC,
                                                                                  process)))
        assert reason is not None and "SVD" in reason


def test_ddnm_is_replacement_through_the_pseudo_inverse():
    """Without noise DDNM's ``x0_hat + A^+ (y - A x0_hat)`` (the operator's pinv) equals
    replacement's update taken through the SVD, at any state and time."""
    forward = operator("matrix", rows=1, seed=0)
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process)).double()
    x = torch.tensor([[0.3, -1.2], [1.5, 0.4]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    y = torch.tensor([[0.7], [-0.4]], dtype=torch.float64)
    ddnm = model.guided([DDNM(forward)], None, y).predict(x, t, "x0")
    replacement = model.guided([Replacement(forward)], None, y).predict(x, t, "x0")
    assert torch.allclose(ddnm, replacement, atol=1e-10)
    assert torch.allclose(forward.A(ddnm), y, atol=1e-10)


def test_ddnm_with_noise_keeps_the_noise(tmp_path):
    """With ``sigma_y > 0`` DDNM still projects onto the noisy ``y``: its restorations satisfy
    ``A x = y`` exactly, so along A's row it has no spread where the posterior has variance
    ``v > 0`` (the bias that DDNM+ addresses; docs/inverse.md)."""
    forward = OPERATORS["tests' matrix"](tmp_path)
    out, _, cov, y = affine_law(forward, DDNM(forward))
    u, _, _, _, _ = directions(forward)
    posterior = GaussianPosterior(ISOTROPIC, forward.matrix(), y[0], forward.sigma_y)
    assert float((forward.A(out) - y).abs().max()) < 1e-6
    assert float(u @ cov @ u) < 1e-9 < 0.01 < float(u @ posterior.covs[0] @ u)


def test_ddnm_refuses_an_operator_without_a_pseudo_inverse():
    from tests.third_party.dkit_tanh_sensor import TanhSensor

    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    reason = DDNM(TanhSensor(sigma_y=0.05, data_shape=(2,))).check(model)
    assert reason == "a linear operator with a pseudo-inverse (TanhSensor is nonlinear: use dps)"


def ddnm_plus_law(s: float, y_bar: float, mu: float, sigma_y: float, steps: int
                  ) -> tuple[float, float]:
    """Mean and variance of DDNM+'s output along one spectral direction (``s = 0``: the null
    space), in the data's units, from ``x_T ~ N(0, 1)`` on VP's DDIM grid: the ancestral move
    ``x_s = c_t x + c_0 ((1 - lambda) x0_hat + lambda y_bar) + sqrt(Phi) z`` (paper, sec. 3.3),
    ``x0_hat = mu + K (x - alpha_t mu)`` the prior's exact denoiser."""
    rows = DDIM(steps=steps).cached_grid(VP()).table.rows
    m, v = 0.0, 1.0
    for i in range(len(rows["alpha_t"])):
        alpha, sigma = rows["alpha_t"][i], rows["sigma_t"][i]
        c_t, c_0, sd = rows["c_t"][i], rows["c_0"][i], math.sqrt(rows["posterior_var"][i])
        K = C**2 * alpha / (C**2 * alpha**2 + sigma**2)
        if s == 0:
            lam, phi = 0.0, sd**2
        elif sd >= c_0 * sigma_y / s:
            lam, phi = 1.0, sd**2 - (c_0 * sigma_y / s) ** 2
        else:
            lam, phi = sd / (c_0 * sigma_y / s), 0.0
        a = c_t + c_0 * (1 - lam) * K
        b = c_0 * ((1 - lam) * mu * (1 - K * alpha) + lam * y_bar)
        m, v = a * m + b, a * a * v + phi
    return m, v


# DDNM+'s law over the exact posterior at 50 and 1,000 steps: along A's row, variance ratio
# and mean error in posterior std; the null direction's variance ratio (docs/inverse.md)
BIAS_PLUS = {
    "tests' matrix": ((0.117, -0.065, 0.838), (0.008, -0.105, 0.989)),
    "[[2, 0.5]]": ((0.161, -0.033, 0.838), (0.014, -0.085, 0.989)),
    "[[0.5, 0.1]]": ((0.049, -0.251, 0.838), (0.004, -0.316, 0.989)),
    "inpaint, sigma_y 0.1": ((0.149, +0.029, 0.838), (0.014, +0.073, 0.989)),
}


def test_ddnm_plus_is_biased_on_a_gaussian_prior_by_the_stated_amounts(tmp_path):
    """DDNM+ treats the noise of ``y_bar`` as if it were fresh at every move, but it is the
    same noise each time: along measured directions the spread collapses onto ``y_bar``'s
    neighbourhood, the more so the more steps (5 % to 16 % of the posterior's variance at 50
    steps, under 1.5 % at 1,000). Its null space is DDPM's ancestral sampler on the prior,
    which converges (0.838 at 50 steps, 0.989 at 1,000)."""
    for operator_name, expected in BIAS_PLUS.items():
        forward = OPERATORS[operator_name](tmp_path)
        u, null, s, y, y_bar = directions(forward)
        mu = ISOTROPIC.means[0].double()
        posterior = GaussianPosterior(ISOTROPIC, forward.matrix(), y, forward.sigma_y)
        v = float(u @ posterior.covs[0] @ u)
        for steps, (ratio, mean_error, null_ratio) in zip((50, 1000), expected, strict=True):
            m, var = ddnm_plus_law(s, y_bar, float(u @ mu), forward.sigma_y, steps)
            _, var0 = ddnm_plus_law(0.0, 0.0, float(null @ mu), forward.sigma_y, steps)
            got = (var / v, (m - float(u @ posterior.means[0])) / math.sqrt(v), var0 / C**2)
            label = f"{operator_name} / {steps}: {got}"
            assert abs(got[0] - ratio) < 0.005 * (1 + ratio), label
            assert abs(got[1] - mean_error) < 0.005 and abs(got[2] - null_ratio) < 0.005, label


def test_ddnm_plus_without_noise_is_ddnm_on_the_ancestral_sampler():
    """With ``sigma_y = 0`` every measured direction takes the full correction and the full
    fresh noise: the same samples as ``ddnm`` (a prediction term) with DDIM at ``eta = 1``
    (the posterior step, taken by the solver), from the same noise."""
    from diffusers_kit.guidance import DDNMPlus

    forward = operator("matrix", rows=1, seed=0)
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    y = forward.A(TRUTH[None].double()).float().expand(500, 1)
    plus, plain = (DDIM(steps=50, eta=1.0).sample(model.guided([term], None, y), (500, 2),
                                                  generator=torch.Generator().manual_seed(2)
                                                  ).samples
                   for term in (DDNMPlus(forward), DDNM(forward)))
    assert torch.allclose(plus, plain, atol=1e-5)
    assert float(plus.std(0)[0]) > 0.1  # not a degenerate comparison


@pytest.mark.parametrize("operator_name", list(OPERATORS))
def test_ddnm_plus_samples_the_law_of_its_kernels(operator_name, tmp_path):
    """As for DDRM: the implementation against the recursion, row and null direction."""
    from diffusers_kit.guidance import DDNMPlus

    forward = OPERATORS[operator_name](tmp_path)
    samples = ddrm_samples(forward, DDNMPlus(forward), steps=50)
    u, null, s, _, y_bar = directions(forward)
    mu = ISOTROPIC.means[0].double()
    for direction, singular in ((u, s), (null, 0.0)):
        m, v = ddnm_plus_law(singular, y_bar, float(direction @ mu), forward.sigma_y, 50)
        along = samples @ direction
        label = (f"{operator_name} / s = {singular:.2f}: mean {float(along.mean()):.4f} vs "
                 f"{m:.4f}, variance {float(along.var()):.5f} vs {v:.5f}")
        assert abs(float(along.mean()) - m) < 4 * math.sqrt(v / N) + 1e-6, label
        assert abs(float(along.var()) / v - 1) < 4 * math.sqrt(2 / N), label

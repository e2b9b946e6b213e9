"""Inverse problems against exact posteriors.

A Gaussian-mixture prior and a linear measurement ``y = A x + sigma_y n`` have a closed-form
posterior, again a mixture (:class:`tests.gaussian_mixture.GaussianPosterior`). Samples are
compared with fresh exact posterior draws by the sliced Wasserstein distance over its noise
floor (two exact sets).

- The plumbing is exact: an *oracle* term adding the exact ``grad log p_t(y | x_t)`` of the
  mixture samples the exact posterior, for every solver family.
- ΠGDM and replacement are exact on an isotropic Gaussian prior (where ``x_0 | x_t`` is the
  Gaussian they assume), DPS only for operators whose singular values are 1 (its biased law
  along A's row space otherwise is measured exactly: the samplers are affine in ``x_T``
  there), and the restorations satisfy the measurement to within its noise.
- On the mixture they are approximations: their measured bias (SWD over floor) is bounded
  here and reported in docs/inverse.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_kit.guidance import DPS, GradientGuidance, PiGDM, Replacement
from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein
from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import DDPM, VE, VP, Flow
from diffusers_kit.registry import get_registry
from diffusers_kit.solvers import DDIM, Ancestral, HeunODE, PredictorCorrector
from tests.gaussian_mixture import (
    LOG_2PI,
    ExactScoreNetwork,
    GaussianMixture,
    GaussianPosterior,
    three_modes,
)

N = 1500
FACTOR = 1.6
DIRECTIONS = random_directions(2, 128, torch.Generator().manual_seed(7))
ISOTROPIC = GaussianMixture([1.0], [[0.5, -0.3]], [[0.8, 0.8]])
MIXTURE = three_modes()
TRUTH = torch.tensor([1.0, 0.2])


def operator(kind: str, **params):  # type: ignore[no-untyped-def]
    return get_registry().build("forward_model", {"kind": kind, **params}, data_shape=(2,))


OPERATORS = {
    "matrix, sigma_y 0.2": lambda: operator("matrix", rows=1, seed=0, sigma_y=0.2),
    "inpaint, noiseless": lambda: operator("inpaint", mask="half"),
    "inpaint, sigma_y 0.1": lambda: operator("inpaint", mask="half", sigma_y=0.1),
}
SOLVERS = {
    "ddim": (lambda: DDIM(steps=100), VP),
    "ancestral": (Ancestral, DDPM),
    "heun": (HeunODE, lambda: VE(sigma_min=0.01, sigma_max=20.0)),
    "predictor-corrector": (PredictorCorrector, VP),
}


class ExactLikelihood(GradientGuidance):
    """The oracle: the mixture's exact ``grad_x log p_t(y | x_t)`` for a linear Gaussian
    measurement. Per component ``x_0 | x_t, k ~ N(m_k, S_k)`` (diagonal), so
    ``p_t(y | x_t) = sum_k p(k | x_t) N(y; A m_k, A S_k A^T + sigma_y^2 I)``; autograd does the
    rest. A third-party measurement term written as one class."""

    needs_labels = False
    needs_measurement = True

    def __init__(self, prior: GaussianMixture, forward) -> None:  # type: ignore[no-untyped-def]
        super().__init__(1.0)
        self.prior, self.forward = prior, forward
        self.A = forward.matrix()

    def gradient(self, model, x, t, y):  # type: ignore[no-untyped-def]
        measured = model.measurements.double()
        xd = x.double().requires_grad_(True)
        alpha, sigma = (c.double()[:, None, None] for c in model.process.marginal(t))
        prior_var = self.prior.stds.double() ** 2  # (K, d)
        post_var = 1 / (1 / prior_var + alpha**2 / sigma**2)  # (B, K, d)
        post_mean = post_var * (self.prior.means / prior_var + alpha * xd[:, None] / sigma**2)
        _, _, log_joint = self.prior._components(xd, alpha[:, 0, 0], sigma[:, 0, 0])
        log_resp = torch.log_softmax(log_joint, dim=1)  # (B, K)
        A = self.A
        cov = torch.einsum("md,bkd,nd->bkmn", A, post_var, A) + (
            self.forward.sigma_y**2 + 1e-12) * torch.eye(A.shape[0], dtype=torch.float64)
        diff = measured[:, None] - torch.einsum("md,bkd->bkm", A, post_mean)
        solved = torch.linalg.solve(cov, diff[..., None])[..., 0]
        log_n = -0.5 * ((diff * solved).sum(-1) + torch.logdet(cov) + A.shape[0] * LOG_2PI)
        total = torch.logsumexp(log_resp + log_n, dim=1).sum()
        (grad,) = torch.autograd.grad(total, xd)
        return grad.to(x.dtype)


def posterior_ratio(prior, forward, method, solver, process, seed: int = 0,  # type: ignore[no-untyped-def]
                    prediction: str = "eps"):
    """SWD of the method's samples to the exact posterior over the noise floor, and the RMS
    measurement residual of the samples (the exact prior network predicts ``prediction``)."""
    y = forward.simulate(TRUTH[None].double(), torch.Generator().manual_seed(seed)).float()
    posterior = GaussianPosterior(prior, forward.matrix(), y[0], forward.sigma_y)
    model = ScoreModel(process, ExactScoreNetwork(prior, process, prediction))
    view = model.guided([method], None, y.expand(N, *y.shape[1:]))
    samples = solver.sample(view, (N, 2), generator=torch.Generator().manual_seed(3)).samples
    generator = torch.Generator().manual_seed(11)
    reference = posterior.sample(N, generator)
    floor = sum(sliced_wasserstein(posterior.sample(N, generator), reference, DIRECTIONS)
                for _ in range(3)) / 3
    residual = (y.double() - forward.A(samples.double())).pow(2).mean(1).sqrt().mean()
    return sliced_wasserstein(samples, reference, DIRECTIONS) / floor, float(residual)


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("operator_name", list(OPERATORS))
def test_the_exact_likelihood_term_samples_the_exact_posterior(operator_name, solver_name):
    """Bayes' rule through the guidance machinery, on a multimodal prior: exact."""
    forward = OPERATORS[operator_name]()
    solver, process = SOLVERS[solver_name]
    ratio, _ = posterior_ratio(MIXTURE, forward, ExactLikelihood(MIXTURE, forward), solver(),
                               process())
    assert ratio < FACTOR, f"{operator_name} / {solver_name}: {ratio:.2f} x floor"


METHODS = {"replacement": Replacement, "pigdm": PiGDM, "dps": DPS}
# DPS's isotropic step is the Gaussian likelihood's only where every singular value is 1
EXACT_ON_ISOTROPIC = [(m, o) for m in METHODS for o in OPERATORS
                      if m != "dps" or o.startswith("inpaint")]


@pytest.mark.parametrize(("method", "operator_name"), EXACT_ON_ISOTROPIC)
def test_methods_are_exact_on_an_isotropic_gaussian_prior(operator_name, method):
    """Where ``x_0 | x_t`` is the Gaussian ``N(x0_hat, r_t^2 I)`` they assume (prior
    ``N(mu, c^2 I)``, ``data_std = c``), the methods sample the exact posterior (DPS only for
    inpainting: see the next test)."""
    forward = OPERATORS[operator_name]()
    term = METHODS[method](forward, data_std=0.8)
    for solver_name in ("ddim", "ancestral", "heun"):
        solver, process = SOLVERS[solver_name]
        ratio, residual = posterior_ratio(ISOTROPIC, forward, term, solver(), process())
        assert ratio < FACTOR, f"{method} / {operator_name} / {solver_name}: {ratio:.2f}"
        if forward.sigma_y == 0:  # exact consistency without noise
            assert residual < 1e-4, residual
        else:  # within the noise: the posterior spreads about sigma_y around y
            assert residual < 2 * forward.sigma_y, residual


@pytest.mark.parametrize("method", ["oracle", "pigdm", "dps"])
def test_gradient_methods_sample_a_path_that_reaches_pure_noise(method):
    """On the flow path (``alpha(1) = 0``) sampling starts at pure noise, where ``x_t`` says
    nothing about ``x_0``: ``grad log p(y | x_t) = 0`` there, and a score increment cannot be
    written as a data prediction (it would divide by ``alpha = 0``). The gradient terms add
    nothing at ``alpha = 0`` and still sample the exact posterior on the isotropic prior (the
    oracle on the mixture too), from ``t = 1`` with every step guided."""
    forward = OPERATORS["inpaint, sigma_y 0.1"]()
    term = {"oracle": lambda: ExactLikelihood(MIXTURE, forward),
            "pigdm": lambda: PiGDM(forward, data_std=0.8),
            "dps": lambda: DPS(forward, data_std=0.8)}[method]()
    prior = MIXTURE if method == "oracle" else ISOTROPIC
    for prediction in ("x0", "velocity"):
        ratio, residual = posterior_ratio(prior, forward, term, DDIM(steps=100), Flow(),
                                          prediction=prediction)
        assert ratio < FACTOR, f"{method} / {prediction}: {ratio:.2f} x floor"
        assert residual < 2 * forward.sigma_y, residual


def matrix_operator(rows, tmp_path, sigma_y: float = 0.2):  # type: ignore[no-untyped-def]
    path = tmp_path / "A.npy"
    np.save(path, np.array(rows, dtype=np.float64))
    return operator("matrix", path=str(path), sigma_y=sigma_y)


# operator -> DPS's measured variance along A's row space over the exact one,
# and its mean error there in exact posterior standard deviations (docs/inverse.md)
ROW_SPACE = {
    "tests' matrix": (lambda tmp: operator("matrix", rows=1, seed=0, sigma_y=0.2), 0.631, -0.099),
    "[[2, 0.5]]": (lambda tmp: matrix_operator([[2.0, 0.5]], tmp), 0.000, -0.287),
    "[[0.5, 0.1]]": (lambda tmp: matrix_operator([[0.5, 0.1]], tmp), 2.467, +0.644),
    "inpaint, sigma_y 0.1": (lambda tmp: operator("inpaint", mask="half", sigma_y=0.1), None, None),
}


def row_space_law(forward, term):  # type: ignore[no-untyped-def]
    """The sampled law of ``term`` along A's row space ``u`` (one row), read exactly from
    Heun's 160 steps being affine in ``x_T`` (see the next test): its variance over the exact
    posterior's ``v``, its mean error in posterior std, the Tweedie-deflated exact ratio and
    the variance ratio in the null space."""
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process))
    x_T = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, -1.3]], dtype=torch.float64)
    A = forward.matrix()
    y = forward.A(TRUTH[None].double())
    posterior = GaussianPosterior(ISOTROPIC, A, y[0], forward.sigma_y)
    u = torch.linalg.svd(A)[2][0]
    null = torch.stack([-u[1], u[0]])
    v = float(u @ posterior.covs[0] @ u)
    alpha, sigma = process.marginal(torch.tensor([process.t_min], dtype=torch.float64))
    deflated = float(alpha**2 * v / (sigma**2 + alpha**2 * v))  # the final Tweedie step
    out = HeunODE(steps=160).sample(model.guided([term], None, y.expand(4, -1)), (4, 2),
                                    x_T=x_T).samples.double()
    M = (out[1:3] - out[0]).T
    assert torch.allclose(out[3], out[0] + M @ x_T[3], atol=1e-5), "not affine in x_T"
    cov = M @ M.T
    null_ratio = float(null @ cov @ null) / float(null @ posterior.covs[0] @ null)
    return (float(u @ cov @ u) / v, float(u @ (out[0] - posterior.means[0])) / v**0.5,
            deflated, null_ratio)


@pytest.mark.parametrize("operator_name", list(ROW_SPACE))
def test_the_sampled_law_along_the_row_space_of_A(operator_name, tmp_path):
    """The sharp check of exactness on an isotropic Gaussian prior ``N(mu, 0.8^2 I)``.

    With an exact prior score, a deterministic sampler driven by replacement, ΠGDM or DPS is
    affine in its start ``x_T ~ N(0, I)`` (every term is affine in ``x_t`` here), so the
    sampled law is exactly ``N(b, M M^T)``, read off from three runs without sampling noise
    (a fourth checks the affinity). Along ``u``, A's row space, the exact posterior has
    variance ``v``; Heun's final Tweedie step at ``t_min`` returns ``E[x_0 | x_t_min, y]``,
    whose variance is ``v alpha^2 v / (sigma^2 + alpha^2 v)`` there. Replacement and ΠGDM
    match that within 0.3 % and their mean within 0.02 posterior std (160 steps); DPS does
    only when every singular value is 1 and otherwise misses by the measured factors (its
    step weighs the residual by ``s / (sigma_y^2 + r_t^2)``, not ``s / (s^2 r_t^2 +
    sigma_y^2)``). An SWD test at N = 1,500 cannot see DPS's 37 % deficit in one direction."""
    build, dps_ratio, dps_mean = ROW_SPACE[operator_name]
    forward = build(tmp_path)
    for name, method in METHODS.items():
        ratio, mean_error, deflated, null_ratio = row_space_law(
            forward, method(forward, data_std=0.8))
        exact = name != "dps" or dps_ratio is None
        label = f"{name} / {operator_name}: variance ratio {ratio:.4f}, mean {mean_error:+.3f}"
        if exact:
            assert abs(ratio - deflated) < 0.003 and abs(mean_error) < 0.02, label
            assert abs(null_ratio - 1) < 0.01, f"{label}; null space {null_ratio:.4f}"
        else:  # the measured bias, as docs/inverse.md states it
            assert abs(ratio - dps_ratio) < 0.01 and abs(mean_error - dps_mean) < 0.01, label
            assert abs(ratio - deflated) > 0.3, label


def test_the_swd_comparison_is_blind_to_dps_row_space_bias():
    """Why the row-space reading exists: on the tests' matrix DPS passes the SWD comparison of
    the isotropic test (1.15 / 0.85 / 0.97 x the floor for DDIM / ancestral / Heun, all under
    its 1.6) although its variance along A's row space is 0.63 x the exact one."""
    forward = OPERATORS["matrix, sigma_y 0.2"]()
    term = DPS(forward, data_std=0.8)
    for solver_name in ("ddim", "ancestral", "heun"):
        solver, process = SOLVERS[solver_name]
        ratio, _ = posterior_ratio(ISOTROPIC, forward, term, solver(), process())
        assert ratio < FACTOR, f"{solver_name}: {ratio:.2f}"
    assert row_space_law(forward, term)[0] < 0.7


# operator -> DiffPIR's measured (variance ratio, mean error) at lam = 1 and lam = 7
DIFFPIR_ROW_SPACE = {
    "tests' matrix": ((0.892, -0.022), (4.153, +0.249)),
    "[[2, 0.5]]": ((0.941, -0.008), (5.458, +0.324)),
    "[[0.5, 0.1]]": ((0.789, -0.121), (2.406, +0.272)),
    "inpaint, sigma_y 0.1": ((0.939, +0.006), (5.405, -0.273)),
}


@pytest.mark.parametrize("operator_name", list(DIFFPIR_ROW_SPACE))
def test_diffpir_is_biased_by_a_stated_amount_on_a_gaussian_prior(operator_name, tmp_path):
    """DiffPIR's proximal step is replacement's with ``r_t^2 = sigma^2 / lam``, where the
    Gaussian prior needs ``c^2 sigma^2 / (c^2 + sigma^2)``: no constant ``lam`` follows it, so
    the law along A's row space is too narrow at ``lam = 1`` (it trusts the measurement too
    much at high noise) and too wide at the paper's larger values (7 here). The measured
    figures (docs/inverse.md), with the same exact reading as the previous test."""
    from diffusers_kit.guidance import DiffPIR

    forward = ROW_SPACE[operator_name][0](tmp_path)
    for lam, (expected_ratio, expected_mean) in zip((1.0, 7.0),
                                                    DIFFPIR_ROW_SPACE[operator_name],
                                                    strict=True):
        ratio, mean_error, deflated, _ = row_space_law(forward, DiffPIR(forward, lam=lam))
        label = f"lam {lam} / {operator_name}: variance ratio {ratio:.4f}, mean {mean_error:+.3f}"
        assert abs(ratio - expected_ratio) < 0.01 and abs(mean_error - expected_mean) < 0.01, \
            label
        assert abs(ratio - deflated) > 0.04, label


def test_diffpir_takes_the_proximal_point():
    """The step against an independent solve of its normal equations,
    ``(A^T A + rho_t I) x = A^T y + rho_t x0_hat`` with ``rho_t = lam sigma_y^2 / sigma^2``
    (the model's output converted back to ``x0``); without noise it is replacement."""
    from diffusers_kit.guidance import DiffPIR

    forward = operator("matrix", rows=2, seed=3, sigma_y=0.2)
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process)).double()
    x = torch.tensor([[0.3, -1.2], [1.5, 0.4]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    y = torch.tensor([[0.7, 0.1], [-0.4, 0.3]], dtype=torch.float64)
    got = model.guided([DiffPIR(forward, lam=3.0)], None, y).predict(x, t, "x0")
    x0 = model.predict(x, t, "x0")
    A = forward.matrix()
    alpha, sigma = process.marginal(t)
    for i in range(2):
        rho = 3.0 * 0.2**2 / float(sigma[i] / alpha[i]) ** 2
        expected = torch.linalg.solve(A.T @ A + rho * torch.eye(2, dtype=torch.float64),
                                      A.T @ y[i] + rho * x0[i])
        assert torch.allclose(got[i], expected, rtol=1e-9, atol=1e-10)
    clean = operator("inpaint", mask="half")
    view = model.guided([DiffPIR(clean, lam=3.0)], None, y[:, :1])
    same = model.guided([Replacement(clean)], None, y[:, :1])
    assert torch.equal(view.predict(x, t, "x0"), same.predict(x, t, "x0"))


def test_the_comparison_has_power():
    """Unguided samples (the prior) are far from the posterior; and a wrong likelihood width
    (data_std 0.3 instead of 0.8) is caught on the isotropic prior."""
    forward = OPERATORS["matrix, sigma_y 0.2"]()

    class Nothing(Replacement):
        def apply(self, evaluate, model, x, t, y):  # type: ignore[no-untyped-def]
            return evaluate(x, t, y)

    ratio, _ = posterior_ratio(ISOTROPIC, forward, Nothing(forward), DDIM(steps=100), VP())
    assert ratio > 5 * FACTOR
    ratio, _ = posterior_ratio(ISOTROPIC, forward, PiGDM(forward, data_std=0.3), DDIM(steps=100),
                               VP())
    assert ratio > 2 * FACTOR


# measured SWD / floor on the three-mode mixture (DDIM 100 steps; ancestral in parentheses),
# docs/inverse.md: approximations, bounded here so that a regression shows
MIXTURE_BIAS = {
    ("replacement", "matrix, sigma_y 0.2"): 6.4, ("replacement", "inpaint, noiseless"): 9.0,
    ("replacement", "inpaint, sigma_y 0.1"): 7.5, ("pigdm", "matrix, sigma_y 0.2"): 12.6,
    ("pigdm", "inpaint, noiseless"): 12.0, ("pigdm", "inpaint, sigma_y 0.1"): 12.2,
    ("dps", "matrix, sigma_y 0.2"): 9.5, ("dps", "inpaint, noiseless"): 12.0,
    ("dps", "inpaint, sigma_y 0.1"): 12.2,
}


@pytest.mark.parametrize(("method", "operator_name"), list(MIXTURE_BIAS))
def test_method_bias_on_a_multimodal_prior_is_bounded(method, operator_name):
    forward = OPERATORS[operator_name]()
    ratio, residual = posterior_ratio(MIXTURE, forward, METHODS[method](forward),
                                      DDIM(steps=100), VP())
    assert ratio < 1.3 * MIXTURE_BIAS[(method, operator_name)]
    if forward.sigma_y == 0:
        assert residual < 1e-4


def test_replacement_keeps_the_known_pixels_exactly_on_images():
    """Noiseless inpainting of images: every solver returns y on the kept pixels."""
    from tests.gaussian_mixture import ExactGaussianNetwork

    shape = (1, 4, 4)
    forward = get_registry().build("forward_model", {"kind": "inpaint", "mask": "center",
                                                     "box_size": 0.5}, data_shape=shape)
    d = 16
    process = VP()
    network = ExactGaussianNetwork(torch.zeros(d), 0.5 * torch.eye(d) + 0.5, process)
    network.data_shape = shape

    class Images(torch.nn.Module):  # the vector network seen as 1x4x4 images
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.prediction, self.learned_variance = network, "eps", False
            self.data_shape, self.num_classes = shape, None

        def forward(self, x, t):  # type: ignore[no-untyped-def]
            return self.inner(x.flatten(1), t).reshape(x.shape)

    model = ScoreModel(process, Images())
    truth = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    y = forward.A(truth)
    for solver in (DDIM(steps=20), Ancestral(), HeunODE(steps=10)):
        samples = solver.sample(model.guided([Replacement(forward)], None, y), (6, *shape),
                                generator=torch.Generator().manual_seed(1)).samples
        assert torch.allclose(forward.A(samples), y, atol=1e-4), type(solver).__name__
        assert not torch.allclose(samples, truth, atol=1e-2)  # the hole is sampled, not copied


def test_repaint_resampling_reduces_the_replacement_bias():
    """Replacement alone is biased on a multimodal prior (the known part only reaches the
    unknown one through the network, one step at a time); RePaint's jumps back in time
    harmonise them: with 10 resamplings the 2-D SWD at N = 1,500 falls from 7.7 to 0.73 x the
    floor, and one resampling is plain ancestral sampling, bit for bit. The sharper checks are
    the next test's."""
    from diffusers_kit.solvers import RePaint

    forward = OPERATORS["inpaint, noiseless"]()
    plain, _ = posterior_ratio(MIXTURE, forward, Replacement(forward), Ancestral(steps=250),
                               DDPM())
    ratio, residual = posterior_ratio(MIXTURE, forward, Replacement(forward), RePaint(), DDPM())
    assert plain > 4 * FACTOR and ratio < FACTOR and residual < 1e-4
    model = ScoreModel(DDPM(), ExactScoreNetwork(MIXTURE, DDPM()))
    a = Ancestral(steps=250).sample(model, (50, 2), generator=torch.Generator().manual_seed(0))
    b = RePaint(resampling=1).sample(model, (50, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe == 250


def unknown_coordinate(solver, y: float, n: int, exact_prior: bool = False):  # type: ignore[no-untyped-def]
    """The 1-D Wasserstein distance of the unknown coordinate's samples (noiseless inpainting
    of the second coordinate, ``x_1 = y``, three-mode prior) to exact posterior draws over its
    floor (three exact pairs), and their standard deviation over the exact one. With
    ``exact_prior`` the solver samples the exact posterior's dominant Gaussian component as
    if it were the prior, unguided: the sampler's own error on that target."""
    from scipy.stats import wasserstein_distance

    from tests.gaussian_mixture import ExactGaussianNetwork

    forward = OPERATORS["inpaint, noiseless"]()
    measured = torch.tensor([[y]])
    posterior = GaussianPosterior(MIXTURE, forward.matrix(), measured[0], 0.0)
    generator = torch.Generator().manual_seed(11)
    reference = posterior.sample(n, generator)[:, 1].double()
    floor = sum(wasserstein_distance(posterior.sample(n, generator)[:, 1].double(), reference)
                for _ in range(3)) / 3
    process = DDPM()
    if exact_prior:
        k = int(posterior.weights.argmax())
        network = ExactGaussianNetwork(posterior.means[k][1:], posterior.covs[k][1:, 1:],
                                       process)
        samples = solver.sample(ScoreModel(process, network), (n, 1),
                                generator=torch.Generator().manual_seed(3)).samples[:, 0]
    else:
        model = ScoreModel(process, ExactScoreNetwork(MIXTURE, process))
        view = model.guided([Replacement(forward)], None, measured.expand(n, 1))
        samples = solver.sample(view, (n, 2),
                                generator=torch.Generator().manual_seed(3)).samples[:, 1]
    samples = samples.double()
    return (wasserstein_distance(samples, reference) / floor,
            float(samples.std() / reference.std()))


def test_repaint_on_a_sharp_one_dimensional_check():
    """What 10 resamplings give, measured on the unknown coordinate alone (N = 4,000; exact
    unimodal posteriors; docs/inverse.md): close, not exact. At ``x_1 = 1`` (the posterior is
    mode 2's conditional) 1.5 x the floor with a 5 % spread deficit, about what 250 ancestral
    steps give when they sample that posterior directly with its exact score (1.7 x, 1.6 %
    deficit; one standard error of these spreads is 1.1 %). At ``x_1 = -1`` (mode 1's
    conditional, narrower) RePaint leaves mass in the wrong mode: 9.7 x the floor and 1.8 x
    the spread (20 resamplings: 4.3 x, 1.2 x), where 250 ancestral steps on the exact
    posterior give 2.3 x and a 5 % deficit."""
    from diffusers_kit.solvers import RePaint

    ratio, spread = unknown_coordinate(RePaint(), 1.0, 4000)
    assert ratio < 2.0 and 0.92 < spread < 0.98, (ratio, spread)
    ratio, spread = unknown_coordinate(Ancestral(steps=250), 1.0, 4000, exact_prior=True)
    assert ratio < 2.2 and 0.95 < spread < 1.02, (ratio, spread)
    ratio, spread = unknown_coordinate(RePaint(), -1.0, 4000)
    assert 6 < ratio < 13 and 1.6 < spread < 2.0, (ratio, spread)
    ratio, spread = unknown_coordinate(Ancestral(steps=250), -1.0, 4000, exact_prior=True)
    assert ratio < 3.0 and 0.91 < spread < 0.985, (ratio, spread)


@pytest.mark.parametrize("step", ["likelihood", "normalised"])
def test_dps_step_sizes_are_the_stated_formulas(step):
    """DPS's score increment against its closed form on a Gaussian prior ``N(mu, c^2 I)``,
    where ``x0_hat = mu + alpha c^2 (x - alpha mu) / (alpha^2 c^2 + sigma^2)`` has Jacobian
    ``J = alpha c^2 / (alpha^2 c^2 + sigma^2) I``, so ``grad ||y - A x0_hat||^2 =
    -2 J A^T (y - A x0_hat)`` with no network gradient: ``likelihood`` adds
    ``-zeta / (2 (sigma_y^2 + r_t^2))`` times that, ``normalised`` ``-zeta alpha / sigma^2 /
    ||y - A x0_hat||`` times it (``x0_hat`` moves by ``zeta grad / ||r||``)."""
    forward = OPERATORS["matrix, sigma_y 0.2"]()
    process = VP()
    model = ScoreModel(process, ExactScoreNetwork(ISOTROPIC, process)).double()
    x = torch.tensor([[0.3, -1.2], [1.5, 0.4]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    y = torch.tensor([[0.7], [-0.4]], dtype=torch.float64)
    term = DPS(forward, zeta=0.7, step=step, data_std=0.8)
    got = model.guided([term], None, y).score(x, t) - model.score(x, t)
    alpha, sigma = (c[:, None] for c in process.marginal(t))
    c2, mu = 0.64, ISOTROPIC.means[0]
    x0 = mu + alpha * c2 * (x - alpha * mu) / (alpha**2 * c2 + sigma**2)
    jacobian = alpha * c2 / (alpha**2 * c2 + sigma**2)
    residual = y - forward.A(x0)
    gradient = -2 * jacobian * forward.A_adjoint(residual)
    if step == "likelihood":
        level2 = (sigma / alpha) ** 2
        weight = 0.7 / (2 * (0.2**2 + c2 * level2 / (c2 + level2)))
    else:
        weight = 0.7 * alpha / sigma**2 / residual.norm(dim=1, keepdim=True)
    assert torch.allclose(got, -weight * gradient, rtol=1e-9, atol=1e-12)
    built = get_registry().build("guidance", {"kind": "dps", "step": step,
                                              "operator": {"kind": "inpaint"}},
                                 data_shape=(2,))
    assert built.step == step

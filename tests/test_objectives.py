"""Objectives against closed forms: eps-loss vs DSM, the DDPM bound's weights, score matching's
minimizer on Gaussian data, Hutchinson's estimator."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.networks.mlp import MLP
from diffusers_kit.objectives import (
    DenoisingScoreMatching,
    HybridLoss,
    ImplicitScoreMatching,
    SimpleLoss,
    SlicedScoreMatching,
    VariationalBound,
)
from diffusers_kit.objectives.score_matching import (
    jacobian_quadratic_form,
    jacobian_trace_exact,
    probe_vectors,
)
from diffusers_kit.processes import DDPM, VE, VP


def per_example_grads(network: torch.nn.Module, losses: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in network.parameters() if p.requires_grad]
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        out.append(torch.cat([g.flatten() for g in grads if g is not None]))
    return out


@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v"])
def test_eps_loss_is_dsm_with_sigma2_weighting_gradients_included(prediction):
    """L_simple = 2/d * DSM(lambda = sigma^2) per example, for values and parameter gradients
    (autograd on a random network, any parameterisation); lambda = 1 divides by sigma^2 and
    lambda = g^2 multiplies by g^2 / sigma^2."""
    torch.manual_seed(0)
    d, n = 3, 6
    process = DDPM(num_steps=50)
    network = MLP(width=16, blocks=2, prediction=prediction, data_shape=(d,)).double()
    model = ScoreModel(process, network)
    x0 = torch.randn(n, d, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 25, 40, 50], dtype=torch.float64) / 50
    noise = torch.randn(n, d, dtype=torch.float64)
    simple = SimpleLoss(target="eps").per_example(model, x0, t, noise)
    dsm = DenoisingScoreMatching().per_example(model, x0, t, noise)
    torch.testing.assert_close(simple, 2.0 / d * dsm)
    for g_simple, g_dsm in zip(per_example_grads(network, simple), per_example_grads(network, dsm),
                               strict=True):
        assert g_dsm.abs().max() > 0
        torch.testing.assert_close(g_simple, 2.0 / d * g_dsm)
    sigma2 = process.sigma(t) ** 2
    unweighted = DenoisingScoreMatching(weighting="none").per_example(model, x0, t, noise)
    torch.testing.assert_close(unweighted, dsm / sigma2)
    likelihood = DenoisingScoreMatching(weighting="likelihood").per_example(model, x0, t, noise)
    torch.testing.assert_close(likelihood, dsm * process.diffusion(t) ** 2 / sigma2)
    # x0 - x0_hat = -sigma / alpha (eps - eps_hat); v - v_hat = (eps - eps_hat) / alpha (VP)
    alpha2 = process.alpha(t) ** 2
    x0_loss = SimpleLoss(target="x0").per_example(model, x0, t, noise)
    torch.testing.assert_close(x0_loss, simple * sigma2 / alpha2)
    v_loss = SimpleLoss(target="v").per_example(model, x0, t, noise)
    torch.testing.assert_close(v_loss, simple / alpha2)


def ho_weights(process: DDPM, i: torch.Tensor, var: str) -> torch.Tensor:
    """beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) from the beta table (Ho et al., eq. 12)."""
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    beta, a, ab = betas[i - 1], 1 - betas[i - 1], abar[i - 1]
    sigma2 = beta if var == "beta" else (1 - abar_prev[i - 1]) / (1 - ab) * beta
    return beta**2 / (2 * sigma2 * a * (1 - ab)), beta, sigma2


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_vlb_term_is_weighted_eps_loss_and_step_one_is_the_decoder(variance):
    torch.manual_seed(1)
    d, steps = 4, 40
    process = DDPM(num_steps=steps)
    network = MLP(width=16, blocks=1, data_shape=(d,)).double()
    model = ScoreModel(process, network)
    i = torch.tensor([1, 2, 3, 17, 39, 40])
    t = i.double() / steps
    x0 = torch.rand(len(i), d, dtype=torch.float64) * 2 - 1
    noise = torch.randn(len(i), d, dtype=torch.float64)
    objective = VariationalBound(variance=variance, decoder_bins=None)
    bits = objective.per_example(model, x0, t, noise)
    nats = bits * d * math.log(2.0) - process.prior_kl(x0)  # = T * L_{i-1}
    sq = d * SimpleLoss().per_example(model, x0, t, noise)  # ||eps - eps_theta||^2
    weight, beta, sigma2 = ho_weights(process, i, variance)
    beta_tilde = ho_weights(process, i, "beta_tilde")[2]
    # KL of two Gaussians with variances beta~ (q) and sigma^2 (p): the mean part is weight * sq
    constant = 0.5 * d * (torch.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)
    torch.testing.assert_close(nats[1:] / steps, weight[1:] * sq[1:] + constant[1:])
    # step 1: the decoder -log N(x0; mu_theta, sigma_1^2), mu_theta = x0_hat, sigma_1^2 = beta_1
    x_t = process.marginal_sample(x0, t, noise)[0]
    x0_hat = model.predict(x_t, t, "x0")[:1]
    expected = 0.5 * ((x0[:1] - x0_hat) ** 2 / beta[0] + torch.log(2 * math.pi * beta[0])).sum()
    torch.testing.assert_close(nats[0] / steps, expected)


class LearnedVariance(Network):
    """eps = W x (trainable), v = a constant (trainable): enough to probe the hybrid loss."""

    def __init__(self, d: int, v: float) -> None:
        super().__init__("eps", learned_variance=True)
        self.data_shape = (d,)
        self.weight = torch.nn.Parameter(0.1 * torch.randn(d, d, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))

    def forward(self, x, t):
        return torch.cat([x @ self.weight.T, self.v.expand_as(x)], dim=1)


def test_learned_variance_interpolates_between_beta_tilde_and_beta_and_hybrid_stops_the_mean():
    torch.manual_seed(2)
    d, steps = 3, 30
    process = DDPM(num_steps=steps)
    i = torch.tensor([2, 5, 11, 30])
    t = i.double() / steps
    x0 = torch.randn(len(i), d, dtype=torch.float64)
    noise = torch.randn(len(i), d, dtype=torch.float64)
    for v, fixed in ((1.0, "beta"), (-1.0, "beta_tilde")):
        model = ScoreModel(process, LearnedVariance(d, v))
        learned = VariationalBound(variance="learned", decoder_bins=None)
        same_mean = ScoreModel(process, LearnedVariance(d, v))
        same_mean.network.learned_variance = False
        same_mean.network.forward = lambda x, t, m=model: m.network(x, t)[:, :d]  # mean half
        reference = VariationalBound(variance=fixed, decoder_bins=None)
        torch.testing.assert_close(learned.per_example(model, x0, t, noise),
                                   reference.per_example(same_mean, x0, t, noise))
    model = ScoreModel(process, LearnedVariance(d, 0.3))
    hybrid = HybridLoss(vlb_weight=0.5, decoder_bins=None).per_example(model, x0, t, noise).sum()
    simple = SimpleLoss().per_example(ScoreModel(process, _mean_only(model.network, d)),
                                      x0, t, noise).sum()
    g_hybrid = torch.autograd.grad(hybrid, [model.network.weight, model.network.v])
    g_simple = torch.autograd.grad(simple, [model.network.weight])
    torch.testing.assert_close(g_hybrid[0], g_simple[0])  # L_vlb does not move the mean
    assert g_hybrid[1].abs() > 0  # but it trains the variance


def _mean_only(network: LearnedVariance, d: int) -> Network:
    class MeanOnly(Network):
        def __init__(self) -> None:
            super().__init__("eps")
            self.inner = network

        def forward(self, x, t):
            return self.inner(x, t)[:, :d]

    return MeanOnly()


def test_ddpm_objectives_refuse_what_they_cannot_train():
    network = MLP(width=8, blocks=1, data_shape=(2,))
    learned = MLP(width=8, blocks=1, learned_variance=True, data_shape=(2,))
    assert "discrete" in SimpleLoss().check(VE(), network)
    assert SimpleLoss().check(DDPM(num_steps=10), network) is None
    assert "learned_variance" in SimpleLoss().check(DDPM(num_steps=10), learned)
    assert "learned_variance" in HybridLoss().check(DDPM(num_steps=10), network)
    assert HybridLoss().check(DDPM(num_steps=10), learned) is None
    assert "learned" in VariationalBound().check(DDPM(num_steps=10), learned)


# -- score matching on Gaussian data: one minimizer --------------------------------------------
class LinearScore(Network):
    """s(x) = A x + b with (A, b) taken from a flat tensor, so a Hessian can be formed."""

    def __init__(self, d: int) -> None:
        super().__init__("score")
        self.d = d
        self.data_shape = (d,)
        self.theta = torch.zeros(d * d + d, dtype=torch.float64)

    def forward(self, x, t):
        a = self.theta[: self.d * self.d].reshape(self.d, self.d)
        return x @ a.T + self.theta[self.d * self.d:]


def newton_fit(value, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact minimizer of a quadratic objective in (A, b): one Newton step from zero."""
    theta = torch.zeros(d * d + d, dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(value, theta)
    hessian = torch.autograd.functional.hessian(value, theta)
    theta = theta - torch.linalg.solve(hessian, grad)
    return theta[: d * d].reshape(d, d), theta[d * d:]


def gaussian_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]], dtype=torch.float64)
    x = mean + torch.randn(n, 2, generator=generator, dtype=torch.float64) @ chol.T
    centred = x - x.mean(0)
    return x, x.mean(0), centred.T @ centred / n  # data, empirical mean, biased covariance


def fit(objective, x: torch.Tensor, seed: int, sigma: float = 0.0):
    d = x.shape[1]
    network = LinearScore(d)
    model = ScoreModel(VE(sigma_min=sigma or 1e-3, sigma_max=10.0), network)
    t = torch.zeros(x.shape[0], dtype=torch.float64)

    def value(theta):
        network.theta = theta
        generator = torch.Generator().manual_seed(seed)  # the same probes / noise every call
        if isinstance(objective, DenoisingScoreMatching):
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            return objective.per_example(model, x, t, noise).mean()
        return objective.per_example(model, x, t, generator).mean()

    return newton_fit(value, d)


def test_implicit_score_matching_with_the_exact_trace_recovers_the_empirical_gaussian_score():
    """ISM's minimizer over linear scores is exactly A = -S^{-1}, b = S^{-1} m (Hyvarinen 2005,
    section 3: the Gaussian case), S and m the empirical covariance and mean."""
    x, m, cov = gaussian_data(500)
    a, b = fit(ImplicitScoreMatching(trace="exact"), x, seed=0)
    precision = torch.linalg.inv(cov)
    torch.testing.assert_close(a, -precision, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, precision @ m, rtol=1e-9, atol=1e-9)


def test_hutchinson_ism_and_ssm_vr_have_the_probe_conditional_closed_form():
    """With probes v_i fixed, 1/2 ||s||^2 + v^T (grad s) v is minimized by A = -V S^{-1},
    V = mean_i v_i v_i^T (derivation: set the gradients in A and b to zero); ISM with Hutchinson's
    trace and SSM-VR are this same objective."""
    x, _, cov = gaussian_data(400)
    for objective in (ImplicitScoreMatching(trace="hutchinson", probe="gaussian"),
                      SlicedScoreMatching(distribution="gaussian", variance_reduction=True)):
        a, _ = fit(objective, x, seed=5)
        generator = torch.Generator().manual_seed(5)
        v = probe_vectors(tuple(x.shape), "gaussian", device=x.device, dtype=x.dtype,
                          generator=generator)
        second_moment = v.T @ v / x.shape[0]
        torch.testing.assert_close(a, -second_moment @ torch.linalg.inv(cov), rtol=1e-8,
                                   atol=1e-8)


@pytest.mark.parametrize(("name", "n"), [("ism_hutchinson", 2000), ("ssm", 2000),
                                         ("ssm_vr", 2000), ("dsm", 20_000)])
def test_sliced_and_denoising_score_matching_reach_the_gaussian_minimizer(name, n):
    """Over K independent probe / noise draws the fitted (A, b) average to the closed form:
    -S^{-1}, S^{-1} m for ISM / SSM (any probes with E vv^T = I) and -(S + sigma^2 I)^{-1},
    (S + sigma^2 I)^{-1} m for DSM at noise sigma (the score of the noised data). Tolerance: 6
    standard errors of the mean of the K fits (t with K - 1 = 7 degrees of freedom). DSM's
    regression target eps / sigma is noisy, hence its larger sample."""
    k, sigma = 8, 0.5
    x, m, cov = gaussian_data(n)
    objective = {
        "ism_hutchinson": ImplicitScoreMatching(trace="hutchinson"),
        "ssm": SlicedScoreMatching(projections=2),
        "ssm_vr": SlicedScoreMatching(variance_reduction=True),
        "dsm": DenoisingScoreMatching(weighting="none"),
    }[name]
    noise_var = sigma**2 if name == "dsm" else 0.0
    target_cov = cov + noise_var * torch.eye(2, dtype=torch.float64)
    precision = torch.linalg.inv(target_cov)
    closed = torch.cat([-precision.flatten(), precision @ m])
    fits = torch.stack([torch.cat([a.flatten(), b]) for a, b in
                        (fit(objective, x, seed=s, sigma=sigma if name == "dsm" else 0.0)
                         for s in range(k))])
    error = (fits.mean(0) - closed).abs()
    standard_error = fits.std(0) / math.sqrt(k)
    assert (standard_error < 0.05 * closed.abs().max()).all(), "the test must be able to fail"
    assert (error <= 6 * standard_error).all(), (fits.mean(0), closed, standard_error)


def test_hutchinson_estimate_is_unbiased_with_the_predicted_variance():
    """v^T J v over Rademacher probes averages to tr J, with variance sum_{i<j} (J_ij + J_ji)^2;
    Gaussian probes add 2 sum_i J_ii^2. Mean within 6 standard errors; sample variance within
    6 standard errors of the variance (fourth moments bounded by the sample's own)."""
    torch.manual_seed(3)
    d, k = 6, 20_000
    network = MLP(width=32, blocks=2, prediction="score", data_shape=(d,)).double()
    model = ScoreModel(VE(), network)
    x = torch.randn(1, d, dtype=torch.float64)
    t = torch.full((1,), 0.5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: model.score(z, t), x)[0, :, 0, :]
    xs = x.expand(k, d).clone().requires_grad_(True)
    exact = jacobian_trace_exact(model.score(xs, t.expand(k))[:1], xs, create_graph=False)
    torch.testing.assert_close(exact[0], torch.trace(jac))
    sym = jac + jac.T
    off = torch.triu(sym, 1).pow(2).sum()
    diagonal = 2 * torch.diag(jac).pow(2).sum()
    for kind, variance in (("rademacher", off), ("gaussian", off + diagonal)):
        generator = torch.Generator().manual_seed(11)
        v = probe_vectors((k, d), kind, device=xs.device, dtype=xs.dtype, generator=generator)
        s = model.score(xs, t.expand(k))
        estimates = jacobian_quadratic_form(s, xs, v, create_graph=False).detach()
        assert abs(estimates.mean() - torch.trace(jac)) < 6 * math.sqrt(variance / k)
        centred = estimates - estimates.mean()
        var_se = math.sqrt((centred.pow(4).mean() - centred.pow(2).mean() ** 2) / k)
        assert abs(centred.pow(2).mean() - variance) < 6 * var_se


def test_likelihood_weighting_is_g_squared_for_a_vp_process():
    torch.manual_seed(4)
    process = VP()
    network = MLP(width=8, blocks=1, data_shape=(2,))
    model = ScoreModel(process, network)
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    base = DenoisingScoreMatching(weighting="none").per_example(model, x0, t, noise)
    weighted = DenoisingScoreMatching(weighting="likelihood").per_example(model, x0, t, noise)
    beta = process.beta(t)  # g(t)^2 = beta(t) for the VP SDE (Song et al. 2021, eq. 11)
    torch.testing.assert_close(weighted, base * beta)


def test_noise_aware_classifier_learns_the_bayes_posterior_at_every_noise_level():
    """Cross-entropy on noised inputs is minimised by q(y | x_t): for two Gaussian classes
    N(mu_k, s^2 I) under VE noise that is softmax_k(-||x - mu_k||^2 / (2 (s^2 + sigma_t^2))).
    The trained classifier's posterior is within 0.02 nats (mean KL) of it at low, middle and
    high noise, while a noise-unaware one (the t = 0 posterior) would be off by much more."""
    from diffusers_kit import Adam, Diffusion
    from diffusers_kit.data import GaussianMixture
    from diffusers_kit.networks import NoiseAwareClassifier
    from diffusers_kit.objectives import NoisyClassification

    torch.manual_seed(0)
    data = GaussianMixture(components=2, radius=1.0, std=0.5, n_train=4000, n_heldout=1)
    process = VE(sigma_min=0.05, sigma_max=3.0, num_levels=8)
    classifier = NoiseAwareClassifier(num_classes=2, channels=32, blocks=2, data_shape=(2,))
    model = Diffusion(process, classifier, NoisyClassification(times="uniform"), device="cpu")
    model.fit(data.load(), steps=400, batch_size=256, optimizer=Adam(lr=3e-3), ema_decay=0.0,
              log_every=100)
    means = data.means()

    def bayes(x, t):
        var = data.std**2 + process.sigma(torch.tensor(t)) ** 2
        return torch.log_softmax(-((x[:, None, :] - means) ** 2).sum(-1) / (2 * var), 1)

    generator = torch.Generator().manual_seed(9)
    x0 = means[torch.randint(0, 2, (4000,), generator=generator)]
    x0 = x0 + data.std * torch.randn(4000, 2, generator=generator)
    noise = torch.randn(4000, 2, generator=generator)
    for t in (0.0, 0.5, 1.0):
        x_t = x0 + process.sigma(torch.tensor(t)) * noise
        with torch.no_grad():
            log_q = torch.log_softmax(model.model(x_t, torch.full((4000,), t)), 1)
        log_p = bayes(x_t, t)
        kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
        assert kl < 0.02, (t, kl)
    x_1 = x0 + process.sigma(torch.tensor(1.0)) * noise
    unaware = bayes(x_1, 1.0).exp() * (bayes(x_1, 1.0) - bayes(x_1, 0.0))
    assert unaware.sum(1).mean() > 0.1
    assert "classification" in SimpleLoss().check(process, classifier)

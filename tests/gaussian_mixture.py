"""The analytic target: a Gaussian mixture whose noised marginals have a closed-form score.

Data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))``. Under any process ``x_t = alpha x0 + sigma eps``
the marginal is again a mixture, ``q_t = sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``,
so its log-density and its score

    grad log q_t(x) = sum_k r_k(x) * (alpha mu_k - x) / (alpha^2 s_k^2 + sigma^2),
    r_k(x) = w_k N_k(x) / sum_j w_j N_j(x)          (responsibilities, by log-sum-exp)

are exact. :class:`ExactScoreNetwork` wraps that score as a dkit network, so every sampler can be
driven by it through the ordinary :class:`diffusers_kit.model.ScoreModel`.

The mixture, its exact-score network and the three-mode target live in
:mod:`diffusers_kit.testing` (plugin authors check their solvers against them, with
``check_solver_on_mixture``); this module adds what only dkit's own tests use.
"""

from __future__ import annotations

import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.testing import LOG_2PI, ExactScoreNetwork, three_modes
from diffusers_kit.testing import ExactMixture as GaussianMixture

__all__ = ["LOG_2PI", "ExactClassifierNetwork", "ExactConditionalNetwork",
           "ExactGaussianNetwork", "ExactScoreNetwork", "GaussianMixture", "GaussianPosterior",
           "exact_model", "overlapping_modes", "separated_modes", "three_modes"]


class ExactConditionalNetwork(Network):
    """The labelled mixture's exact class-conditional score (label ``k``: component ``k``) and,
    for the null label ``K``, the exact marginal score: a perfect classifier-free-guidance
    network (labels are the mixture's components)."""

    def __init__(self, mixture: GaussianMixture, process: NoiseProcess,
                 prediction: str = "eps") -> None:
        super().__init__(prediction)
        self.mixture, self.process = mixture, process
        self.data_shape = (mixture.dim,)
        self.num_classes = len(mixture.weights)
        self.class_dropout = 0.5  # as if trained with dropout: its null label is exact

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        tt = t.double()
        alpha, sigma = self.process.marginal(tt)
        score = self.mixture.score(x, alpha, sigma).double()
        if y is not None:
            conditional = self.mixture.component_score(x, alpha, sigma, y.clamp_max(
                self.num_classes - 1))
            known = (y < self.num_classes)[:, None]
            score = torch.where(known, conditional, score)
        return self.process.convert(score, x.double(), tt, "score",
                                    self.prediction).to(x.dtype)


class ExactClassifierNetwork(Network):
    """The exact noisy classifier of the labelled mixture: logits ``log w_k N_k(x_t)``, so
    ``softmax = p(y = k | x_t)`` under the process's marginal at ``t``."""

    prediction = "logits"  # as the classifier network says (Network's own check knows no logits)

    def __init__(self, mixture: GaussianMixture, process: NoiseProcess) -> None:
        torch.nn.Module.__init__(self)
        self.mixture, self.process = mixture, process
        self.data_shape = (mixture.dim,)
        self.num_labels = len(mixture.weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(t.double())
        _, _, log_joint = self.mixture._components(x, alpha, sigma)
        return log_joint.to(x.dtype)


def exact_model(mixture: GaussianMixture, process: NoiseProcess,
                prediction: str = "eps") -> ScoreModel:
    return ScoreModel(process, ExactScoreNetwork(mixture, process, prediction))


def separated_modes() -> GaussianMixture:
    """Three well-separated labelled modes (labels = components): nearly every draw of a
    component is nearest to that component's mean, so class accuracy can be asked to be 99 %."""
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, -1.0], [2.4, 0.0], [0.0, 2.6]],
        stds=[[0.30, 0.20], [0.25, 0.40], [0.20, 0.20]],
    )


def overlapping_modes() -> GaussianMixture:
    """Two overlapping modes: a target that plain (non-annealed) Langevin dynamics can mix on."""
    return GaussianMixture(weights=[0.6, 0.4], means=[[-0.5, 0.0], [0.5, 0.2]],
                           stds=[[0.4, 0.3], [0.35, 0.45]])



class GaussianPosterior:
    """The exact posterior of a Gaussian-mixture prior (diagonal components) given a linear
    measurement ``y = A x + sigma_y n`` (``A`` dense, ``(m, d)``): again a mixture, of full-
    covariance Gaussians, with

        Sigma_k' = (Sigma_k^-1 + A^T A / sigma_y^2)^-1,
        mu_k'    = Sigma_k' (Sigma_k^-1 mu_k + A^T y / sigma_y^2),
        w_k'     ∝ w_k N(y; A mu_k, A Sigma_k A^T + sigma_y^2 I).

    ``sigma_y = 0`` is handled as the limit (the known directions fixed), through a tiny
    ``sigma_y`` of 1e-6."""

    def __init__(self, prior: GaussianMixture, A: torch.Tensor, y: torch.Tensor,
                 sigma_y: float) -> None:
        A = A.double()
        y = y.double().flatten()
        s2 = max(sigma_y, 1e-6) ** 2
        means, covs, logw = [], [], []
        for k in range(len(prior.weights)):
            prior_cov = torch.diag(prior.stds[k] ** 2)
            precision = torch.linalg.inv(prior_cov) + A.T @ A / s2
            cov = torch.linalg.inv(precision)
            cov = (cov + cov.T) / 2
            mean = cov @ (torch.linalg.solve(prior_cov, prior.means[k]) + A.T @ y / s2)
            evidence = torch.distributions.MultivariateNormal(
                A @ prior.means[k], A @ prior_cov @ A.T + s2 * torch.eye(A.shape[0],
                                                                        dtype=torch.float64))
            means.append(mean)
            covs.append(cov)
            logw.append(prior.weights[k].log() + evidence.log_prob(y))
        self.means = torch.stack(means)
        self.covs = torch.stack(covs)
        self.weights = torch.softmax(torch.stack(logw), 0)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs + 1e-12 * torch.eye(self.means.shape[1]))
        return (self.means[k] + (chol[k] @ z[..., None])[..., 0]).float()


class ExactGaussianNetwork(Network):
    """The exact score of a full-covariance Gaussian ``N(mu, Sigma)`` under ``process``:
    ``-(alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu)``."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, process: NoiseProcess,
                 prediction: str = "eps") -> None:
        super().__init__(prediction)
        self.mean, self.cov, self.process = mean.double(), cov.double(), process
        self.data_shape = (len(mean),)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double()
        alpha, sigma = self.process.marginal(tt)
        eye = torch.eye(len(self.mean), dtype=torch.float64)
        cov = alpha[:, None, None] ** 2 * self.cov + sigma[:, None, None] ** 2 * eye
        diff = x.double() - alpha[:, None] * self.mean
        score = -torch.linalg.solve(cov, diff[..., None])[..., 0]
        return self.process.convert(score, x.double(), tt, "score",
                                    self.prediction).to(x.dtype)

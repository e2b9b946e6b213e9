"""A testing kit for plugin authors: the contract checks dkit applies to its own components,
callable from a plugin's tests.

>>> from diffusers_kit.testing import check_solver, check_forward_model, check_metric
>>> check_solver(MySolver())                  # doctest: +SKIP
>>> check_forward_model(MyOperator(data_shape=(1, 8, 8)))   # doctest: +SKIP

Each check raises ``AssertionError`` with a message that says what the protocol expects. They
use exact answers, so a pass means the component is right, not merely that it runs:

- :func:`check_process` checks a noise process's identities: its forward SDE integrates to its
  marginal ``(alpha, sigma)``, the transition composes the marginals, the posterior
  ``q(x_s | x_t, x_0)`` is Bayes' rule (in closed form and by Monte Carlo), the
  parameterisations (eps, score, x0, v, mu) describe one prediction, the prior is a density;
- :func:`check_solver` drives the solver with the exact score of standard normal data (any
  process: the noised marginal of ``N(0, I)`` is ``N(0, alpha^2 + sigma^2)``), so its samples
  must have mean 0 and variance 1; it also checks the shape, ``nfe`` and that guidance reaches
  it through the model (a term that shifts the score must shift the samples);
- :func:`check_solver_on_mixture` drives it with the exact score of a three-mode Gaussian
  mixture (:class:`ExactMixture`) and asks its samples to be within ``factor`` times the
  sliced Wasserstein noise floor of exact samples (a solver that stays at the prior fails);
- :func:`check_forward_model` checks, by the capabilities the operator declares, autograd's
  derivative of ``A`` against finite differences, ``simulate``'s noise against its noise
  model, ``<A x, y> = <x, A^T y>``, the SVD when there is one and the pseudo-inverse (a
  nonlinear operator: ``A(pinv(A x)) = A x`` where it offers ``pinv``);
- :func:`check_metric` checks that the result is a dict of numbers, that a set scored against
  itself is no worse than a shifted copy;
- :func:`check_registered` checks that a component is registered (through the entry point the
  plugin declares), builds from its defaults, and has a JSON Schema.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.guidance.base import GradientGuidance
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import PREDICTIONS, NoiseProcess

if TYPE_CHECKING:
    from diffusers_kit.forward_models.base import ForwardModel
    from diffusers_kit.metrics.base import Metric
    from diffusers_kit.solvers.base import Solver

#: z-bound of the statistical checks: a two-sided tail of about 2e-9, so they do not flake
Z = 6.0
LOG_2PI = math.log(2 * math.pi)


class StandardNormalScore(Network):
    """The exact eps of standard normal data under any process: ``eps = sigma x / (alpha^2 +
    sigma^2)`` (the score of ``N(0, alpha^2 + sigma^2)`` times ``-sigma``)."""

    def __init__(self, process: NoiseProcess, data_shape: tuple[int, ...]) -> None:
        super().__init__("eps")
        self.process, self.data_shape = process, tuple(data_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(t.double())
        scale = (sigma / (alpha**2 + sigma**2)).to(x.dtype)
        return scale.reshape(-1, *([1] * (x.dim() - 1))) * x


class StandardNormalConsistency(Network):
    """The exact consistency function of standard normal data under any process (Song et al.
    2023): the probability-flow map to ``t_min``, ``f(x, t) = (x / alpha) sqrt(1 + s_min^2) /
    sqrt(1 + s^2)`` with ``s = sigma / alpha`` (the standardised ``x / alpha`` is constant along
    the flow of Gaussian data); it predicts ``x0``."""

    def __init__(self, process: NoiseProcess, data_shape: tuple[int, ...]) -> None:
        super().__init__("x0")
        self.process, self.data_shape = process, tuple(data_shape)
        alpha, sigma = process.marginal(torch.tensor([float(process.t_min)], dtype=torch.float64))
        self.level_min = float(sigma[0] / alpha[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(t.double())
        scale = ((1 + self.level_min**2) / (alpha**2 + sigma**2)).sqrt().to(x.dtype)
        return scale.reshape(-1, *([1] * (x.dim() - 1))) * x


class _Shift(GradientGuidance):
    """``+ scale * 1``: a constant pull, whose effect on the samples any solver must show."""

    needs_labels = False

    def gradient(self, model, x, t, y):  # type: ignore[no-untyped-def]
        return torch.ones_like(x)


def check_solver(solver: Solver, process: NoiseProcess | None = None, n: int = 2000,
                 data_shape: tuple[int, ...] = (2,), seed: int = 0) -> None:
    """The solver samples standard normal data from its exact score (a solver whose
    ``samples_from`` is ``consistency``: from its exact consistency function): shape, finite
    values, ``nfe`` counted, mean 0 and variance 1 within a tolerance set for ``n``, and
    guidance reaching it through the model. ``process`` defaults to the first built-in one the
    solver's ``check`` accepts (``ddpm``, ``vp``, ``ve`` with levels)."""
    process = accepted_process(solver, process)
    exact = (StandardNormalConsistency if getattr(solver, "samples_from", "diffusion")
             == "consistency" else StandardNormalScore)
    model = ScoreModel(process, exact(process, data_shape))
    shape = (n, *data_shape)
    result = solver.sample(model, shape, generator=torch.Generator().manual_seed(seed))
    name = type(solver).__name__
    samples = result.samples
    assert tuple(samples.shape) == shape, f"{name}.sample returned shape " \
                                          f"{tuple(samples.shape)} for {shape}"
    assert torch.isfinite(samples).all(), f"{name}.sample returned non-finite values"
    assert isinstance(result.nfe, int) and result.nfe > 0, f"{name}: nfe must count the " \
        f"network evaluations (model.nfe after minus before), got {result.nfe!r}"
    assert result.nfe == model.nfe, f"{name}: nfe {result.nfe} but the model it is given " \
        f"was called {model.nfe} times (ask that model, whose predictions carry guidance)"
    flat = samples.double().flatten(1)
    tolerance = 6 / n**0.5  # six standard errors of a mean of n unit variables
    assert flat.mean(0).abs().max() < tolerance, \
        f"{name}: the samples' mean is {flat.mean(0).tolist()}, not 0 (standard normal data)"
    assert (flat.var(0) - 1).abs().max() < 0.15, \
        f"{name}: the samples' variance is {flat.var(0).tolist()}, not 1 (standard normal data)"
    guided = solver.sample(model.guided([_Shift(scale=1.0)]), shape,
                           generator=torch.Generator().manual_seed(seed)).samples
    assert guided.double().mean() > samples.double().mean() + 0.2, \
        f"{name}: a guidance term that pulls every sample up changed nothing: the solver must " \
        "ask the model it is given (model.predict / model.score), not the network"


def accepted_process(solver: Solver, process: NoiseProcess | None = None) -> NoiseProcess:
    """``process`` when the solver's ``check`` accepts it; by default the first built-in one it
    accepts (``ddpm``, ``vp``, ``ve`` with levels)."""
    from diffusers_kit.processes import DDPM, VE, VP

    if process is None:
        for candidate in (DDPM(), VP(), VE(sigma_min=0.01, sigma_max=20.0, num_levels=20)):
            if solver.check(candidate) is None:
                process = candidate
                break
        assert process is not None, (f"{type(solver).__name__}.check refuses ddpm, vp and ve: "
                                     "pass the process it samples")
    reason = solver.check(process)
    assert reason is None, f"{type(solver).__name__}.check refuses {type(process).__name__}: "\
                           f"{reason}"
    return process


# -- the analytic target: a Gaussian mixture whose noised marginals have an exact score ---------
class ExactMixture:
    """``sum_k weights[k] N(means[k], diag(stds[k]^2))`` in ``d`` dimensions (float64).

    Under any process ``x_t = alpha x0 + sigma eps`` the marginal is again a mixture,
    ``q_t = sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``, so its log-density and its
    score ``grad log q_t(x) = sum_k r_k(x) (alpha mu_k - x) / (alpha^2 s_k^2 + sigma^2)``
    (``r_k`` the responsibilities, by log-sum-exp) are exact.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor,
                 means: Sequence[Sequence[float]] | torch.Tensor,
                 stds: Sequence[Any] | torch.Tensor | float) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, d)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand_as(self.means).clone() if stds.dim() < 2 else stds  # (K, d)
        self.dim = self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).float()

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.double()
        alpha = alpha.double().reshape(-1, 1, 1)
        sigma = sigma.double().reshape(-1, 1, 1)
        mean = alpha * self.means.to(x.device)  # (B, K, d)
        var = alpha**2 * self.stds.to(x.device) ** 2 + sigma**2
        diff = x[:, None, :] - mean
        log_n = -0.5 * (diff**2 / var + var.log() + LOG_2PI).sum(-1)  # (B, K)
        log_joint = log_n + self.weights.to(x.device).log()
        return diff, var, log_joint

    def _times(self, x: torch.Tensor, alpha: torch.Tensor | None, sigma: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        alpha = torch.ones(n, dtype=torch.float64) if alpha is None else alpha
        sigma = torch.zeros(n, dtype=torch.float64) if sigma is None else sigma
        return alpha, sigma

    def log_prob(self, x: torch.Tensor, alpha: torch.Tensor | None = None,
                 sigma: torch.Tensor | None = None) -> torch.Tensor:
        """``log q_t(x)`` (``alpha = 1, sigma = 0``: the data density)."""
        _, _, log_joint = self._components(x, *self._times(x, alpha, sigma))
        return torch.logsumexp(log_joint, dim=1)

    def score(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``grad log q_t(x)``, exact."""
        diff, var, log_joint = self._components(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=1)  # (B, K)
        return (resp[..., None] * (-diff / var)).sum(1).to(x.dtype)

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_t] = sum_k r_k(x) (mu_k + alpha s_k^2 (x - alpha mu_k) / (alpha^2 s_k^2 +
        sigma^2))``, exact (Tweedie's formula per component); defined at ``alpha = 0`` too,
        where it is the mixture's mean."""
        diff, var, log_joint = self._components(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=1)  # (B, K)
        gain = alpha.double().reshape(-1, 1, 1) * self.stds.to(x.device) ** 2 / var
        return (resp[..., None] * (self.means.to(x.device) + gain * diff)).sum(1).to(x.dtype)

    def component_score(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                        k: torch.Tensor) -> torch.Tensor:
        """``grad log q_t(x | y = k)``: the score of component ``k`` alone (one ``k`` per row)."""
        diff, var, _ = self._components(x, alpha, sigma)
        rows = torch.arange(x.shape[0], device=x.device)
        return (-diff[rows, k.long()] / var[rows.clamp_max(var.shape[0] - 1), k.long()]
                ).to(x.dtype)

    def posterior(self, x: torch.Tensor, alpha: torch.Tensor | None = None,
                  sigma: torch.Tensor | None = None) -> torch.Tensor:
        """``p(y = k | x)`` under ``q_t`` (default: the data), shape ``(B, K)``."""
        _, _, log_joint = self._components(x, *self._times(x, alpha, sigma))
        return torch.softmax(log_joint, dim=1)

    def sample_labelled(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw of component ``labels[i]`` per row (the exact class-conditional samples)."""
        z = torch.randn(len(labels), self.dim, generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.stds[labels] * z).float()


class ExactScoreNetwork(Network):
    """The mixture's exact marginal score under ``process``, in the ``prediction`` requested:
    a perfect network, so a solver driven by it can only err by its own discretisation."""

    def __init__(self, mixture: ExactMixture, process: NoiseProcess,
                 prediction: str = "eps") -> None:
        super().__init__(prediction)
        self.mixture, self.process = mixture, process
        self.data_shape = (mixture.dim,)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double()
        alpha, sigma = self.process.marginal(tt)
        if self.prediction not in ("eps", "score"):  # through x0, exact where alpha = 0 too
            x0 = self.mixture.denoise(x, alpha, sigma)  # (the score says nothing there)
            return self.process.convert(x0.double(), x.double(), tt, "x0",
                                        self.prediction).to(x.dtype)
        score = self.mixture.score(x, alpha, sigma)
        return self.process.convert(score.double(), x.double(), tt, "score",
                                    self.prediction).to(x.dtype)


def three_modes() -> ExactMixture:
    """The standard 2-D target: three anisotropic modes with unequal weights."""
    return ExactMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-1.0, -0.5], [1.2, 0.0], [0.0, 1.3]],
        stds=[[0.30, 0.20], [0.25, 0.40], [0.20, 0.20]],
    )


class ODEReference:
    """A tight solve of the probability-flow ODE from the start noise ``x_T`` and the RMS
    distance of any solver's samples to it from the same noise: the accuracy measure of a
    deterministic solver, with the discretisation as its only error when the model is exact.

    The reference is DPM-Solver++(3M) on ``steps`` (1000) equal log-SNR steps, written out so
    that it does not move with the solvers' default grid. On the three-mode mixture at scales
    0.3-3 its distance to a 2000-step solve (continuous processes) or to third-order UniPC on
    1000 quadratic steps (DDPM, linear and cosine) is below 2e-4, against the 0.008-0.35
    errors the tests and benchmarks compare. ``scale`` divides the error (for data of another
    scale than 1)."""

    def __init__(self, model: ScoreModel, x_T: torch.Tensor, steps: int = 1000,
                 scale: float = 1.0) -> None:
        from diffusers_kit.solvers import DPMSolver3M

        self.model, self.x_T, self.scale = model, x_T, scale
        self.exact = DPMSolver3M(steps=steps, spacing="log_snr").sample(
            model, tuple(x_T.shape), x_T=x_T).samples

    def error(self, solver: Solver) -> float:
        """RMS per coordinate of ``solver``'s samples from ``x_T`` to the reference, over
        ``scale``."""
        return self.run(solver)[1]

    def run(self, solver: Solver) -> tuple[int, float]:
        """``(true NFE, error)`` of one ``solver.sample`` from ``x_T``."""
        result = solver.sample(self.model, tuple(self.x_T.shape), x_T=self.x_T)
        return result.nfe, self.distance(result.samples)

    def distance(self, samples: torch.Tensor) -> float:
        """RMS per coordinate of ``samples`` (drawn from ``x_T`` by any sampler, dkit's or not)
        to the reference, over ``scale``."""
        return float((samples - self.exact).pow(2).mean().sqrt()) / self.scale


class MixtureTarget:
    """``n`` exact reference samples of ``mixture`` and the sliced Wasserstein noise floor: the
    SWD between two exact sample sets of that size, averaged over ``floor_pairs`` independent
    pairs (so one lucky draw cannot set it), along ``projections`` fixed random directions.
    :meth:`ratio` is a sample set's SWD to the reference over that floor: near 1 for exact
    samples, well above for a wrong sampler."""

    def __init__(self, mixture: ExactMixture, n: int = 2000, projections: int = 128,
                 floor_pairs: int = 3, seed: int = 11, direction_seed: int = 7) -> None:
        from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein

        self.mixture, self.n = mixture, n
        self.directions = random_directions(mixture.dim, projections,
                                            torch.Generator().manual_seed(direction_seed))
        generator = torch.Generator().manual_seed(seed)
        self.reference = mixture.sample(n, generator)
        floors = [sliced_wasserstein(mixture.sample(n, generator), self.reference,
                                     self.directions) for _ in range(floor_pairs)]
        self.floor = sum(floors) / len(floors)

    def ratio(self, samples: torch.Tensor) -> float:
        from diffusers_kit.metrics.swd import sliced_wasserstein

        assert torch.isfinite(samples).all(), "the samples have non-finite values"
        return sliced_wasserstein(samples, self.reference, self.directions) / self.floor


def check_solver_on_mixture(solver: Solver, process: NoiseProcess | None = None,
                            n: int = 2000, factor: float = 1.5, seed: int = 3) -> float:
    """The solver, driven by the exact score of :func:`three_modes` (three anisotropic modes
    with unequal weights), draws ``n`` samples whose SWD to exact samples is below ``factor``
    times the noise floor (:class:`MixtureTarget`): sampling error well below the Monte-Carlo
    error of the comparison. Every built-in solver passes at its defaults with the default
    ``factor`` 1.5; a solver that leaves the prior, or one step short of denoising, does not.
    ``process`` as for :func:`check_solver`. Returns the ratio."""
    process = accepted_process(solver, process)
    mixture = three_modes()
    model = ScoreModel(process, ExactScoreNetwork(mixture, process))
    result = solver.sample(model, (n, mixture.dim), generator=torch.Generator().manual_seed(seed))
    name = type(solver).__name__
    assert tuple(result.samples.shape) == (n, mixture.dim), \
        f"{name}.sample returned shape {tuple(result.samples.shape)} for {(n, mixture.dim)}"
    target = MixtureTarget(mixture, n)
    ratio = target.ratio(result.samples)
    assert ratio < factor, (
        f"{name} on {type(process).__name__}: the samples of the exact three-mode mixture are "
        f"{ratio:.2f} times the noise floor ({target.floor:.4f}) away from exact samples, "
        f"above {factor}: a wrong step, too few steps, or a last step that does not denoise")
    return ratio


# -- noise processes: the identities of the math layer ------------------------------------------
def on_grid(process: NoiseProcess, t: float) -> float:
    """``t``, or for a discrete process (rates jumping at the steps ``i / T``) the nearest step
    (at least ``1 / T``): an integration of its SDE ends on one."""
    if process.num_steps is None:
        return t
    return max(1, round(t * process.num_steps)) / process.num_steps


def sde_step_count(process: NoiseProcess, minimum: int, t1: float = 1.0) -> int:
    """At least ``minimum`` steps over ``[0, t1]``; for a discrete process a multiple of its
    steps in ``[0, t1]``, so that no Euler-Maruyama step straddles a jump of the rate."""
    if process.num_steps is None:
        return minimum
    chain_steps = round(t1 * process.num_steps)
    return chain_steps * math.ceil(minimum / chain_steps)


def euler_maruyama_moments(process: NoiseProcess, t0: float, t1: float, steps: int, m0: float,
                           v0: float) -> tuple[float, float]:
    """Exact mean and variance after ``steps`` Euler-Maruyama steps of the process's forward
    SDE from ``N(m0, v0)`` at ``t0`` to ``t1``. The SDE is linear, ``f(x, t) = a(t) x``, so the
    result is Gaussian: ``m <- (1 + a h) m``, ``v <- (1 + a h)^2 v + g^2 h``."""
    h = (t1 - t0) / steps
    t = t0 + h * torch.arange(steps, dtype=torch.float64)
    a = process.drift(torch.ones(steps, 1, dtype=torch.float64), t)[:, 0]  # f(x, t) = a(t) x
    g2 = process.diffusion(t) ** 2
    gain = 1.0 + a * h
    mean = m0 * torch.prod(gain)
    # noise injected at step k is amplified by the gains of the later steps
    later = torch.flip(torch.cumprod(torch.flip(gain**2, [0]), 0), [0])
    later = torch.cat([later[1:], torch.ones(1, dtype=torch.float64)])
    var = v0 * torch.prod(gain**2) + torch.sum(g2 * h * later)
    return mean.item(), var.item()


def assert_first_order_convergence(iterates: Sequence[Any], target: torch.Tensor,
                                   what: str = "") -> None:
    """``iterates`` after K, 2K and 4K steps of a first-order scheme converge to ``target``.

    Euler's iterates are ``x_K = x* + A / K + B / K^2 + O(K^-3)``; Richardson extrapolation
    ``(8 x_4K - 6 x_2K + x_K) / 3`` removes both terms, leaving ``x*`` up to ``O(K^-3)``, while
    the iterates themselves still spread by ``O(1 / K)``. So the extrapolated limit must sit far
    closer to ``target`` than the spread of the iterates: a scheme converging to another limit
    is an O(1) distance away. No tolerance is tuned.
    """
    first, second, third = (torch.as_tensor(x, dtype=torch.float64) for x in iterates)
    limit = (8 * third - 6 * second + first) / 3
    spread = (first - third).norm().item()
    scale = 1.0 + target.norm().item()
    assert (limit - target).norm().item() <= 0.1 * spread + 1e-10 * scale, (
        f"{what}converges to {limit.tolist()}, not {target.tolist()} (iterates spread by "
        f"{spread:.3g})")


def assert_sde_matches_marginal(process: NoiseProcess, t1: float, x0: float,
                                min_steps: int = 200) -> None:
    """The forward SDE ``dx = f dt + g dw`` (``drift``, ``diffusion``) integrates to the
    marginal: Euler-Maruyama's exact moments from ``x_0`` converge, at first order, to
    ``alpha(t1) x0`` and ``sigma(t1)^2``."""
    t0, t1 = 0.0, on_grid(process, t1)
    t = torch.tensor([t0, t1], dtype=torch.float64)
    alpha, sigma = process.marginal(t)
    m0, v0 = alpha[0].item() * x0, sigma[0].item() ** 2
    exact = torch.tensor([alpha[1].item() * x0, sigma[1].item() ** 2], dtype=torch.float64)
    k = sde_step_count(process, min_steps, t1)
    iterates = [euler_maruyama_moments(process, t0, t1, steps, m0, v0)
                for steps in (k, 2 * k, 4 * k)]
    assert_first_order_convergence(
        iterates, exact, f"{type(process).__name__}: the forward SDE (drift, diffusion) from "
        f"x0 = {x0} to t = {t1} has mean and variance that ")


def assert_transition_composes(process: NoiseProcess, s: float, t: float) -> None:
    """``q(x_t | x_0) = int q(x_t | x_s) q(x_s | x_0)``: ``alpha_t = a alpha_s`` and
    ``sigma_t^2 = a^2 sigma_s^2 + b^2`` for the transition ``(a, b)`` from ``s`` to ``t``."""
    s_t = torch.tensor([s], dtype=torch.float64)
    t_t = torch.tensor([t], dtype=torch.float64)
    a, b = process.transition(t_t, s_t)
    alpha_s, sigma_s = process.marginal(s_t)
    alpha_t, sigma_t = process.marginal(t_t)
    name = type(process).__name__
    assert math.isclose((a * alpha_s).item(), alpha_t.item(), rel_tol=1e-9, abs_tol=1e-12), \
        f"{name}.transition({t}, {s}): a alpha_s = {(a * alpha_s).item()} but alpha_t = " \
        f"{alpha_t.item()}"
    assert math.isclose((a**2 * sigma_s**2 + b**2).item(), sigma_t.item() ** 2, rel_tol=1e-9,
                        abs_tol=1e-14), \
        f"{name}.transition({t}, {s}): a^2 sigma_s^2 + b^2 = " \
        f"{(a**2 * sigma_s**2 + b**2).item()} but sigma_t^2 = {sigma_t.item() ** 2}"


def process_times(process: NoiseProcess, u: float, v: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` with ``0 < s < t <= 1`` from ``u, v`` in ``[0, 1]``: adjacent steps for a
    discrete process (``s`` its previous step), else ``t`` in ``[0.02, 1]`` and ``s`` in
    ``(0, t)``; each a float64 tensor of shape ``(1,)``."""
    if process.num_steps is not None:
        i = 2 + round(u * (process.num_steps - 2))
        t = torch.tensor([i / process.num_steps], dtype=torch.float64)
        return t, process.previous_time(t)
    t = 0.02 + 0.98 * u
    return (torch.tensor([t], dtype=torch.float64),
            torch.tensor([t * (0.02 + 0.96 * v)], dtype=torch.float64))


def assert_posterior_is_bayes_rule(process: NoiseProcess, t: torch.Tensor, s: torch.Tensor,
                                   x0: torch.Tensor, x_t: torch.Tensor) -> None:
    """``N(x_s; alpha_s x0, sigma_s^2) N(x_t; a x_s, b^2)`` is, in ``x_s``, proportional to
    ``N(mean, var)`` with ``1/var = 1/sigma_s^2 + a^2/b^2`` and
    ``mean = var (alpha_s x0 / sigma_s^2 + a x_t / b^2)``: ``posterior`` must say so
    (``t``, ``s`` of shape ``(1,)``, ``x0``, ``x_t`` of shape ``(1, d)``, float64)."""
    alpha_s, sigma_s = process.marginal(s)
    a, b = process.transition(t, s)
    var = 1 / (1 / sigma_s**2 + a**2 / b**2)
    expected = var * (alpha_s * x0 / sigma_s**2 + a * x_t / b**2)
    mean, got_var = process.posterior(x_t, x0, t, s)
    name = type(process).__name__
    assert math.isclose(got_var.item(), var.item(), rel_tol=1e-9, abs_tol=1e-12), \
        f"{name}.posterior: variance {got_var.item()}, Bayes' rule says {var.item()}"
    assert torch.allclose(mean, expected, rtol=1e-9, atol=1e-12), \
        f"{name}.posterior: mean {mean.tolist()}, Bayes' rule says {expected.tolist()}"


def assert_posterior_matches_monte_carlo(process: NoiseProcess, t: torch.Tensor,
                                         s: torch.Tensor, x0: torch.Tensor, n: int,
                                         generator: torch.Generator) -> None:
    """Forward pairs ``x_s ~ q(x_s | x0)``, ``x_t ~ q(x_t | x_s)`` (``marginal_sample``,
    ``transition_sample``): the residual ``x_s - mean(x_t, x0)`` has mean 0, the posterior's
    variance and no correlation with ``x_t``, within z-bounds for ``n`` samples (``x0``:
    ``(1, d)``)."""
    dim = x0.shape[-1]
    x0 = x0.expand(n, dim)
    tt, ss = t.expand(n), s.expand(n)
    x_s, _ = process.marginal_sample(x0, ss, torch.randn(n, dim, generator=generator,
                                                         dtype=torch.float64))
    x_t = process.transition_sample(x_s, ss, tt, torch.randn(n, dim, generator=generator,
                                                            dtype=torch.float64))
    mean, var = process.posterior(x_t, x0, tt, ss)
    residual = x_s - mean
    var = var[0].item()
    name = f"{type(process).__name__}.posterior at t={t.item():.4g}, s={s.item():.4g}"
    assert (residual.mean(0).abs() <= Z * math.sqrt(var / n)).all(), \
        f"{name}: forward-sampled x_s miss the posterior mean by {residual.mean(0).tolist()}"
    assert ((residual.var(0) - var).abs() <= Z * var * math.sqrt(2 / (n - 1))).all(), \
        f"{name}: forward-sampled x_s spread by {residual.var(0).tolist()}, not {var}"
    x_t_centered = x_t - x_t.mean(0)
    covariance = (residual * x_t_centered).mean(0)
    assert (covariance.abs() <= Z * math.sqrt(var) * x_t.std(0) / math.sqrt(n)).all(), \
        f"{name}: the residual x_s - mean correlates with x_t ({covariance.tolist()}): " \
        "the coefficient of x_t is wrong"


def assert_parameterisations_agree(process: NoiseProcess, t: torch.Tensor, s: torch.Tensor,
                                   x0: torch.Tensor, eps: torch.Tensor, source: str,
                                   target: str) -> None:
    """From a known ``(x0, eps)``: ``score = -eps / sigma``, ``x0``, ``v = alpha eps - sigma
    x0``, ``mu = mean of q(x_s | x_t, x0)`` and ``velocity = alpha' x0 + sigma' eps`` all
    describe it, and ``convert`` maps ``source``
    to ``target`` (``t``, ``s``: ``(B,)``; ``x0``, ``eps``: ``(B, d)``)."""
    x_t, _ = process.marginal_sample(x0, t, eps)
    alpha, sigma = (c[:, None] for c in process.marginal(t))
    d_alpha, d_sigma = (c[:, None] for c in process.marginal_rates(t))
    views = {
        "eps": eps,
        "score": -eps / sigma,
        "x0": x0,
        "v": alpha * eps - sigma * x0,
        "mu": process.posterior(x_t, x0, t, s)[0],
        "velocity": d_alpha * x0 + d_sigma * eps,
    }
    got = process.convert(views[source], x_t, t, source, target, s=s)
    scale = 1 + views[target].abs().max()
    assert torch.allclose(got, views[target], rtol=1e-6, atol=1e-6 * scale), \
        f"{type(process).__name__}.convert({source} -> {target}) differs from the {target} " \
        "of the same (x0, eps)"


def assert_rates_match_marginal(process: NoiseProcess, times: Sequence[float],
                                h: float = 1e-5) -> None:
    """``marginal_rates(t) = (alpha'(t), sigma'(t))`` agree with finite differences of
    ``marginal`` (central, one-sided at ``t = 1``; error ``O(h^2)``, resp. ``O(h)``, of the
    second derivatives' size). A process whose ``alpha`` reaches 0 states its rates itself;
    the probability flow's data form reads them there."""
    name = type(process).__name__
    for t in times:
        points = (t - h, t + h) if t + h <= 1.0 else (t - h, t)
        low, high = (process.marginal(torch.tensor([p], dtype=torch.float64)) for p in points)
        width = points[1] - points[0]
        numeric = [(b - a).item() / width for a, b in zip(low, high, strict=True)]
        rates = [r.item() for r in process.marginal_rates(torch.tensor([t], dtype=torch.float64))]
        for label, got, expected in zip(("alpha'", "sigma'"), rates, numeric, strict=True):
            assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-4), \
                f"{name}.marginal_rates({t}): {label} = {got}, the marginal's slope is {expected}"


def assert_prior_is_a_density(process: NoiseProcess, n: int = 4000,
                              generator: torch.Generator | None = None) -> None:
    """In one dimension ``int p(x_1) dx = 1`` numerically (``prior_log_prob``), and
    ``prior_sample`` draws have the prior's mean 0 and variance ``prior_std^2``."""
    from scipy import integrate

    def density(x: float) -> float:
        return math.exp(process.prior_log_prob(torch.tensor([[x]], dtype=torch.float64)).item())

    name = type(process).__name__
    std = process.prior_std()
    total, error = integrate.quad(density, -40 * std, 40 * std, points=[0.0], limit=200)
    assert abs(total - 1.0) <= max(10 * error, 1e-9), \
        f"{name}.prior_log_prob integrates to {total}, not 1"
    generator = generator or torch.Generator().manual_seed(0)
    samples = process.prior_sample((n, 1), generator=generator, dtype=torch.float64)
    assert abs(samples.var().item() - std**2) <= Z * std**2 * math.sqrt(2.0 / (n - 1)), \
        f"{name}.prior_sample has variance {samples.var().item()}, prior_std^2 is {std**2}"
    assert abs(samples.mean().item()) <= Z * std / math.sqrt(n), \
        f"{name}.prior_sample has mean {samples.mean().item()}, not 0"


def check_process(process: NoiseProcess, seed: int = 0, n: int = 20000) -> None:
    """The identities every noise process must satisfy (DESIGN.md, "the math layer"):

    - ``marginal(t)`` gives finite ``(alpha, sigma)`` of shape ``(B,)``, ``alpha > 0`` and
      ``sigma > 0`` for ``t > 0``; ``alpha(1) = 0`` is allowed (a path to pure noise, such as
      rectified flow's): then ``marginal_rates`` must match the marginal's slopes
      (:func:`assert_rates_match_marginal`), the SDE is integrated to ``t = 0.9`` only (its
      drift is infinite at 1) and at ``t = 1`` the conversions from ``eps`` or the score to
      what needs ``x0`` are skipped (undefined there);
    - the drift is linear in ``x`` (Gaussian marginals need ``f(x, t) = a(t) x``) and the SDE
      integrates to the marginal (:func:`assert_sde_matches_marginal`, first-order convergence
      of Euler-Maruyama's exact moments, no tuned tolerance);
    - the transition composes the marginals (:func:`assert_transition_composes`);
    - the posterior ``q(x_s | x_t, x_0)`` is Bayes' rule, in closed form and by Monte Carlo
      with ``n`` pairs;
    - ``convert`` maps every parameterisation to every other;
    - the prior is a normalised density that ``prior_sample`` draws from.

    The same functions check dkit's own processes (its tests draw the times with hypothesis).
    """
    name = type(process).__name__
    generator = torch.Generator().manual_seed(seed)
    times = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    alpha, sigma = process.marginal(times)
    assert tuple(alpha.shape) == tuple(sigma.shape) == (11,), \
        f"{name}.marginal(t) must return two tensors shaped like t, got " \
        f"{tuple(alpha.shape)} and {tuple(sigma.shape)}"
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all(), \
        f"{name}.marginal has non-finite values on [0, 1]: {alpha.tolist()}, {sigma.tolist()}"
    pure_noise = alpha[-1].item() == 0.0  # x_1 = sigma(1) eps: rectified flow's path
    assert (alpha[:-1] > 0).all() and (alpha[-1] >= 0) and (sigma[1:] > 0).all(), \
        f"{name}.marginal: alpha must be > 0 on [0, 1) (0 allowed at t = 1) and sigma > 0 " \
        "for t > 0"
    if pure_noise:
        assert_rates_match_marginal(process, (0.3, 0.7, 1.0))
    x, y = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    t = times[2:6]
    assert torch.allclose(process.drift(2 * x - 3 * y, t),
                          2 * process.drift(x, t) - 3 * process.drift(y, t), atol=1e-12), \
        f"{name}.drift is not linear in x: a Gaussian process x_t = alpha x0 + sigma eps " \
        "needs f(x, t) = a(t) x"
    for t1 in (0.5, 0.9 if pure_noise else 1.0):  # the SDE is singular where alpha = 0
        for x0 in (-1.5, 2.0):
            assert_sde_matches_marginal(process, t1, x0)
    for s_value, t_value in ((0.1, 0.4), (0.3, 0.9), (0.5, 1.0)):
        assert_transition_composes(process, on_grid(process, s_value),
                                   on_grid(process, t_value))
    for u, v in ((0.1, 0.5), (0.6, 0.2), (1.0, 0.9)):
        t_pair, s_pair = process_times(process, u, v)
        x0_one, x_t_one = torch.randn(2, 1, 2, generator=generator, dtype=torch.float64)
        assert_posterior_is_bayes_rule(process, t_pair, s_pair, x0_one, x_t_one)
        assert_posterior_matches_monte_carlo(process, t_pair, s_pair, 2 * x0_one, n, generator)
        x0_batch, eps = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64)
        for source in PREDICTIONS:
            for target in PREDICTIONS:
                if (pure_noise and t_pair.item() == 1.0 and source in ("eps", "score")
                        and target not in ("eps", "score")):
                    continue  # at alpha = 0, eps (or the score) says nothing about x0
                assert_parameterisations_agree(process, t_pair.expand(3), s_pair.expand(3),
                                               x0_batch, eps, source, target)
    assert_prior_is_a_density(process, generator=generator)


def check_forward_model(operator: ForwardModel, batch: int = 3, seed: int = 0,
                        draws: int = 20000) -> None:
    """The protocol's identities, by the capabilities the operator declares (``linear``,
    ``has_svd``, ``has_pinv``; :mod:`diffusers_kit.forward_models.base`):

    - every operator: ``A``'s shape, and its dtype following the input's; autograd's
      vector-Jacobian product of ``A`` against central finite differences (float64: what DPS
      differentiates); ``simulate``'s noise against its noise model's mean and variance
      (:func:`assert_simulate_matches_noise_model`, about ``draws`` values);
    - a linear one: ``<A x, y> = <x, A^T y>`` to 1e-9 in float64; the SVD reproduces ``A`` when
      there is one, with ``V`` orthogonal; ``A A^+ A = A``;
    - a nonlinear one offering ``pinv``: ``A(pinv(A(x))) == A(x)``; one that does not must
      refuse ``A_adjoint``, ``matrix`` and ``pinv`` rather than answer.
    """
    name = type(operator).__name__
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *operator.data_shape, generator=g, dtype=torch.float64)
    ax = operator.A(x)
    assert tuple(ax.shape) == (batch, *operator.measurement_shape), f"{name}.A: shape " \
        f"{tuple(ax.shape)} for a batch of {batch} of {operator.data_shape}, expected " \
        f"{(batch, *operator.measurement_shape)}"
    assert operator.A(x.float()).dtype == torch.float32, f"{name}.A: float32 in, " \
        f"{operator.A(x.float()).dtype} out"
    assert_vjp_matches_finite_differences(operator, x, g)
    assert_simulate_matches_noise_model(operator, x, draws, seed)
    if not operator.linear:
        for method, call in (("A_adjoint", lambda: operator.A_adjoint(ax)),
                             ("matrix", operator.matrix)):
            try:
                call()
            except (NotImplementedError, ValueError):
                continue
            raise AssertionError(f"{name} declares linear = False but {method} answered: a "
                                 "nonlinear operator has no adjoint and no matrix")
        if operator.has_pinv:
            assert torch.allclose(operator.A(operator.pinv(ax)), ax, atol=1e-7, rtol=1e-6), \
                f"{name}: A(pinv(A x)) differs from A x"
        return
    y = torch.randn(batch, *operator.measurement_shape, generator=g, dtype=torch.float64)
    aty = operator.A_adjoint(y)
    assert tuple(aty.shape) == tuple(x.shape), f"{name}.A_adjoint: shape {tuple(aty.shape)}"
    lhs, rhs = (ax * y).flatten(1).sum(1), (x * aty).flatten(1).sum(1)
    scale = ax.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert ((lhs - rhs).abs() <= 1e-9 * scale).all(), \
        f"{name}: A_adjoint is not the adjoint of A (<Ax, y> = {lhs.tolist()}, <x, A^T y> = " \
        f"{rhs.tolist()})"
    if operator.has_svd:
        s = operator.singulars()
        z = operator.Vt(x)[:, : s.numel()] * s
        full = torch.nn.functional.pad(z, (0, operator.m - s.numel()))
        assert torch.allclose(operator.U(full), ax, atol=1e-9, rtol=1e-7), \
            f"{name}: U diag(s) V^T x differs from A x"
        assert torch.allclose(operator.V(operator.Vt(x)), x, atol=1e-9), f"{name}: V is not " \
                                                                          "orthogonal"
    if operator.has_pinv:
        assert torch.allclose(operator.A(operator.pinv(ax)), ax, atol=1e-7, rtol=1e-6), \
            f"{name}: A A^+ A differs from A"


def assert_vjp_matches_finite_differences(operator: ForwardModel, x: torch.Tensor,
                                          generator: torch.Generator, directions: int = 3,
                                          step: float = 1e-5) -> None:
    """``d/dh <A(x + h e), w>`` at 0 by central differences (float64, step ``step``) equals
    ``<e, J^T w>`` from autograd, for random ``e`` and ``w``: the gradient DPS takes through
    ``A`` is ``A``'s own (relative error 1e-6 of ``|J^T w| |e|``)."""
    name = type(operator).__name__
    w = torch.randn(x.shape[0], *operator.measurement_shape, generator=generator,
                    dtype=torch.float64)
    xg = x.detach().clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad((operator.A(xg) * w).sum(), xg)
    for _ in range(directions):
        e = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            difference = ((operator.A(x + step * e) - operator.A(x - step * e)) * w).sum() / (
                2 * step)
        got = (vjp * e).sum()
        bound = 1e-6 * max(1.0, float(vjp.norm() * e.norm()))
        assert abs(float(got - difference)) <= bound, \
            f"{name}: autograd's vector-Jacobian product of A gives {float(got):.9g} along a " \
            f"direction where finite differences give {float(difference):.9g} (A must be " \
            "differentiable by autograd, and its backward must be its own derivative)"


def assert_simulate_matches_noise_model(operator: ForwardModel, x: torch.Tensor,
                                        draws: int = 20000, seed: int = 0) -> None:
    """``simulate`` draws from ``operator.noise``: the residual ``y - E[y | A x]`` standardised
    by the noise model's variance has mean 0 and mean square 1 within ``Z`` standard errors
    over about ``draws`` values (where the variance is 0, ``y`` is the mean exactly), and the
    same generator seed gives the same draw."""
    name = type(operator).__name__
    noise = operator.noise
    repeats = max(1, math.ceil(draws / (x.shape[0] * operator.m)))
    xs = x.repeat(repeats, *([1] * (x.dim() - 1)))
    y = operator.simulate(xs, torch.Generator().manual_seed(seed))
    again = operator.simulate(xs, torch.Generator().manual_seed(seed))
    assert torch.equal(y, again), f"{name}.simulate: the same generator gave different draws"
    a = operator.A(xs)
    assert tuple(y.shape) == tuple(a.shape), f"{name}.simulate: shape {tuple(y.shape)}"
    variance = noise.variance(a).flatten()
    residual = (y - noise.mean(a)).flatten()
    silent = variance == 0
    assert (residual[silent] == 0).all(), \
        f"{name}.simulate: noise where its noise model ({noise.describe()}) has none"
    if bool(silent.all()):
        return
    z = residual[~silent] / variance[~silent].sqrt()
    n = z.numel()
    assert abs(float(z.mean())) <= Z / math.sqrt(n), \
        f"{name}.simulate: the noise has mean {float(residual.mean()):.4g}, not 0 " \
        f"({noise.describe()})"
    square = z.pow(2)
    assert abs(float(square.mean()) - 1) <= Z * float(square.std()) / math.sqrt(n), \
        f"{name}.simulate: the noise's variance is {float(square.mean()):.4f} times its noise " \
        f"model's ({noise.describe()})"


def check_metric(metric: Metric, data: DataSplits, generator_seed: int = 0,
                 name: str | None = None) -> dict[str, Any]:
    """The metric returns a dict of numbers; the held-out set scored against itself is no
    worse than the same set shifted by half its spread (for the metric's first value, lower
    is taken as better unless ``higher_is_better`` is set on the metric). Returns the result
    on the held-out set."""
    from diffusers_kit.graph import checked_metric

    label = name or type(metric).__name__
    real = metric.evaluate(data.heldout, data, torch.Generator().manual_seed(generator_seed))
    values = checked_metric(label, metric, real)
    assert values, f"{label}.evaluate returned no values"
    key = next(iter(values))
    spread = data.heldout.double().std().item()
    shifted = checked_metric(label, metric, metric.evaluate(
        data.heldout + 0.5 * spread, data, torch.Generator().manual_seed(generator_seed)))
    better = getattr(metric, "higher_is_better", False)
    same, other = values[key], shifted[key]
    assert (same >= other) if better else (same <= other), \
        f"{label}: {key} is {same} for the held-out set itself and {other} for a shifted copy"
    return values


def check_registered(kind: str, name: str, **context: Any) -> Any:
    """The component is registered (e.g. through the plugin's entry point), builds from its
    defaults (``context``: what the run graph would pass, e.g. ``data_shape=(1, 8, 8)``) and
    has a JSON Schema. Returns the built component."""
    from diffusers_kit.registry import get_registry
    from diffusers_kit.spec.schema import spec_schema

    registry = get_registry()
    component = registry.get(kind, name)
    built = registry.build(kind, {"kind": name}, **context)
    problems: list[str] = []
    schema = spec_schema(registry, {component.source}, problems)
    assert not [p for p in problems if f"{name!r}" in p], problems
    names = {o["properties"]["kind"]["const"] for o in schema["$defs"][kind].get("oneOf", [])}
    assert name in names, f"{kind} {name!r} is missing from the JSON Schema"
    return built


__all__ = ["ExactMixture", "ExactScoreNetwork", "MixtureTarget", "StandardNormalConsistency",
           "StandardNormalScore",
           "accepted_process", "assert_first_order_convergence", "assert_parameterisations_agree",
           "assert_posterior_is_bayes_rule", "assert_posterior_matches_monte_carlo",
           "assert_prior_is_a_density", "assert_rates_match_marginal",
           "assert_sde_matches_marginal", "assert_simulate_matches_noise_model",
           "assert_transition_composes", "assert_vjp_matches_finite_differences",
           "check_forward_model", "check_metric", "check_process", "check_registered",
           "check_solver", "check_solver_on_mixture",
           "euler_maruyama_moments", "on_grid", "process_times", "sde_step_count", "three_modes"]

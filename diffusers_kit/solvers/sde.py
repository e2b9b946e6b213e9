"""Reverse-time SDE samplers: predictors, correctors and predictor-corrector sampling.

Song et al. 2021 ("Score-Based Generative Modeling through SDEs", section 4.2, Algorithms 2-3
and appendix G). The reverse of ``dx = f(x, t) dt + g(t) dw`` is
``dx = [f(x, t) - g(t)^2 grad log q_t(x)] dt + g(t) dw_bar`` (eq. 6). On a grid
``t_0 = 1 > ... > t_N = 0``, with ``dt = t_i - t_{i+1} > 0`` and ``s = score(x, t_i)``:

* Euler-Maruyama: ``x <- x - [f(x, t_i) - g(t_i)^2 s] dt + g(t_i) sqrt(dt) z``;
* reverse diffusion (eq. 46): reverse the forward discretisation ``x_{i+1} = a x_i + b z``
  (``a, b`` the process's transition between the two times):
  ``x <- x - (a - 1) x + b^2 s + b z``;
* ancestral sampling (eq. 47 for VP, 48 for VE): the posterior mean with Tweedie's
  ``x0_hat = (x + sigma_t^2 s) / alpha_t`` plus noise of the posterior (``beta~``) or
  transition (``beta``) variance.

The Langevin corrector (Algorithm 4 for VP, 5 for VE) runs at each time before the predictor::

    eps = 2 a_i (r ||z|| / ||s||)^2,    x <- x + eps s + sqrt(2 eps) z

with signal-to-noise ratio ``r`` and ``a_i = a^2`` the squared transition coefficient of the
step (``1 - beta_i`` for VP, 1 for VE). As in Song et al.'s code the norms are averaged over the
batch: per-sample norms make the step explode in low dimension. The last predictor
step returns its mean, without noise (Song et al.'s "noise removal"), and lands on noise level 0
(:mod:`diffusers_kit.solvers.tables`): reverse diffusion and ancestral sampling do so through
their own formulas with ``sigma_s = 0``; Euler-Maruyama, whose step has no target noise level,
ends with Tweedie's ``x0_hat = alpha_s (x + sigma_t^2 s) / alpha_t`` (on VE ``t_min = 0``, where
its step would be empty).

The score comes from the network's ``eps`` and the table's ``sigma_t``: ``s = -eps / sigma_t``,
with no per-step evaluation of the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.solvers.base import Callback, Solver, Steps, options
from diffusers_kit.solvers.grids import Spacing, TimeGrid, reaches_pure_noise
from diffusers_kit.solvers.noise import Noise
from diffusers_kit.solvers.tables import step_table

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor
Rows = dict[str, list[float]]


def _factor(c: Rows, name: str, i: int) -> float | Tensor:
    """Row ``name`` at step ``i``: the cached 0-dim tensor when ``c`` offers one under
    ``name + ":tensor"`` (:func:`predictor_rows`), else the float."""
    tensors = c.get(name + ":tensor")
    return tensors[i] if tensors is not None else c[name][i]


#: The step-table rows a predictor multiplies a state by (offered as 0-dim tensors).
TENSOR_ROWS = ("ancestral_x", "neg_inv_sigma", "reverse_x", "euler_x")


def predictor_rows(grid: TimeGrid, like: Tensor) -> dict[str, list]:
    """What a predictor gets as ``c``: the table's float ``rows`` plus, under
    ``"<name>:tensor"``, the :data:`TENSOR_ROWS` as cached 0-dim tensors of ``like``'s device
    and dtype (a predictor that knows no ``:tensor`` key reads the float rows)."""
    key = ("predictor_rows", str(like.device), like.dtype)
    if key not in grid._vectors:
        grid._vectors[key] = {**grid.rows, **{f"{name}:tensor": grid.scalar(name, like)
                                              for name in TENSOR_ROWS}}
    return grid._vectors[key]


class Predictor:
    """Base of predictors: one step of a reverse-time SDE solver from ``times[i]`` to ``[i+1]``.

    ``step`` gets the score at ``(x, t_i)`` (computed once by the sampler), the table rows ``c``
    and the noise ``z`` (``None`` on the last step) and returns the next state.

    A predictor may also define ``step_eps(x, eps, c, i, z)``, the same step given ``eps_hat``
    (``s = -eps_hat / sigma_t``, folded into its coefficients): the sampler then skips forming
    the score. It is used only where the class that defines ``step_eps`` also defines the
    ``step`` in use, so a subclass that overrides ``step`` alone keeps its own step.
    """

    uses_score = True

    def step(self, x: Tensor, score: Tensor, c: Rows, i: int, z: Tensor | None) -> Tensor:
        raise NotImplementedError


def eps_step(predictor: Predictor) -> Callable[..., Tensor] | None:
    """``predictor.step_eps`` when the class that defines it defines the ``step`` in use."""
    for klass in type(predictor).__mro__:
        defines = vars(klass)
        if "step" in defines or "step_eps" in defines:
            return getattr(predictor, "step_eps", None) if "step_eps" in defines \
                and "step" in defines else None
    return None


class LinearPredictor(Predictor):
    """A predictor linear in the score: :meth:`move` with the score ``k v`` is both ``step``
    (``v = s``, ``k = 1``) and ``step_eps`` (``v = eps_hat``, ``k = -1 / sigma_t``)."""

    def step(self, x: Tensor, score: Tensor, c: Rows, i: int, z: Tensor | None) -> Tensor:
        return self.move(x, score, 1.0, c, i, z)

    def step_eps(self, x: Tensor, eps: Tensor, c: Rows, i: int, z: Tensor | None) -> Tensor:
        return self.move(x, eps, c["neg_inv_sigma"][i], c, i, z)

    def move(self, x: Tensor, v: Tensor, k: float, c: Rows, i: int, z: Tensor | None
             ) -> Tensor:
        raise NotImplementedError


class EulerMaruyama(LinearPredictor):
    """Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6); the last step is
    Tweedie's denoising step onto noise level 0."""

    def move(self, x: Tensor, v: Tensor, k: float, c: Rows, i: int, z: Tensor | None
             ) -> Tensor:
        if z is None:
            return (c["alpha_s"][i] / c["alpha_t"][i]) * torch.add(
                x, v, alpha=c["sigma_t"][i] ** 2 * k)
        step = c["g2"][i] * c["dt"][i]
        mean = torch.add(x * _factor(c, "euler_x", i), v, alpha=step * k)
        return mean.add_(z, alpha=step**0.5)


class ReverseDiffusion(LinearPredictor):
    """Reverse-diffusion predictor (Song et al. 2021, eq. 46): the forward step, reversed."""

    def move(self, x: Tensor, v: Tensor, k: float, c: Rows, i: int, z: Tensor | None
             ) -> Tensor:
        mean = torch.add(x * _factor(c, "reverse_x", i), v, alpha=c["b2"][i] * k)
        return mean if z is None else mean.add_(z, alpha=c["b2"][i] ** 0.5)


@dataclass(eq=False, repr=False)
class AncestralPredictor(LinearPredictor):
    """Ancestral-sampling predictor (Song et al. 2021, eqs. 47-48): posterior mean with Tweedie's
    x0_hat, plus noise.

    Args:
        variance: ``posterior`` (beta~, Song et al.'s choice for VE) or ``transition`` (beta,
            their choice for VP).
    """

    variance: Literal["posterior", "transition"] = "posterior"

    def move(self, x: Tensor, v: Tensor, k: float, c: Rows, i: int, z: Tensor | None
             ) -> Tensor:
        # c_t x + c_0 x0_hat with x0_hat = (x + sigma_t^2 s) / alpha_t, as one fused map
        mean = torch.add(x * _factor(c, "ancestral_x", i), v, alpha=c["ancestral_score"][i] * k)
        if z is None:
            return mean
        var = c["posterior_var"][i] if self.variance == "posterior" else c["b2"][i]
        return mean.add_(z, alpha=var**0.5)


class NoPredictor(Predictor):
    """No predictor: x stays; time moves on (corrector-only sampling, "C2000" in Song et al.)."""

    uses_score = False

    def step(self, x: Tensor, score: Tensor, c: Rows, i: int, z: Tensor | None) -> Tensor:
        return x


class Corrector:
    """Base of correctors: score-based MCMC at a fixed time that moves x toward ``q_t``."""

    steps: int = 0

    def correct(self, model: ScoreModel, x: Tensor, t: Tensor, c: Rows, i: int,
                noise: Noise) -> Tensor:
        return x


@dataclass(eq=False, repr=False)
class LangevinCorrector(Corrector):
    """Langevin corrector with the signal-to-noise step rule (Song et al. 2021, Algorithms 4-5).

    Args:
        snr: the signal-to-noise ratio r (Song et al.: 0.16 for VE; 0.01 for VP on CIFAR-10).
        steps: corrector steps M at each time.
    """

    snr: Annotated[float, Field(gt=0, le=100)] = 0.16
    steps: Steps = 1

    def correct(self, model: ScoreModel, x: Tensor, t: Tensor, c: Rows, i: int,
                noise: Noise) -> Tensor:
        scale = 2.0 * c["a"][i] ** 2 * self.snr**2
        sigma = c["sigma_t"][i]
        dims = tuple(range(1, x.dim()))
        for _ in range(self.steps):
            eps_hat = model.predict(x, t, "eps")
            z = noise.randn_like(x)
            # batch-averaged norms (as Song et al.): a per-sample ratio explodes in low
            # dimensions, where a sample at a mode's centre has a score near zero.
            # With s = -eps_hat / sigma and q = mean ||z|| / mean ||eps_hat|| (= the ratio of
            # the sums): the ratio is sigma q, the step eps = scale sigma^2 q^2, and
            # x + eps s + sqrt(2 eps) z is x - scale sigma q^2 eps_hat + sigma sqrt(2 scale) q z
            # (no host sync: q stays a 0-dim device tensor)
            q = (torch.linalg.vector_norm(z, dim=dims).sum()
                 / torch.linalg.vector_norm(eps_hat, dim=dims).sum())
            x = torch.addcmul(x, eps_hat, q * q, value=-scale * sigma)
            x.addcmul_(z, q, value=sigma * (2.0 * scale) ** 0.5)
        return x


class NoCorrector(Corrector):
    """No corrector (predictor-only sampling, "P1000" in Song et al.)."""


@options
class PredictorCorrector(Solver):
    """Predictor-corrector sampling of the reverse-time SDE (Song et al. 2021, Algorithm 1).

    Any predictor (``euler_maruyama``, ``reverse_diffusion``, ``ancestral``, ``none``) with any
    corrector (``langevin``, ``none``), each a nested ``{kind: ...}`` mapping in a spec.

    Args:
        predictor: the predictor (default: reverse diffusion).
        corrector: the corrector (default: none, i.e. predictor-only sampling).
        steps: number of predictor steps (default: a discrete process's steps; 1000 otherwise);
            network evaluations are ``steps * (1 + corrector steps)``.
        spacing: how the times are spaced.
    """

    predictor: Predictor | None = None
    corrector: Corrector | None = None
    steps: Steps | None = None
    spacing: Spacing = "uniform"

    def __post_init__(self) -> None:
        self.predictor = self.predictor if self.predictor is not None else ReverseDiffusion()
        self.corrector = self.corrector if self.corrector is not None else NoCorrector()

    def check(self, process: NoiseProcess) -> str | None:
        if reaches_pure_noise(process):
            return ("alpha > 0 on the whole path (this process reaches alpha = 0, where the "
                    "reverse SDE's drift f = alpha' / alpha is infinite and the score says "
                    "nothing about x0): use ancestral, ddim or edm_stochastic")
        return None

    def grid(self, process: NoiseProcess) -> TimeGrid:
        return step_table(process, self.steps, self.spacing)

    def run(self, model: ScoreModel, x: Tensor, grid: TimeGrid, noise: Noise,
            callback: Callback) -> Tensor:
        times, last = grid.vectors(x.shape[0], x), grid.steps - 1
        rows = predictor_rows(grid, x)
        uses_score, from_eps = self.predictor.uses_score, eps_step(self.predictor)
        for i in range(grid.steps):
            t, marginal = times[i], (grid.scalar("alpha_t", x)[i], grid.scalar("sigma_t", x)[i])
            x = self.corrector.correct(model, x, t, rows, i, noise)
            eps = model.predict(x, t, "eps", marginal=marginal) if uses_score else x
            callback(i, x, (x - marginal[1] * eps) / marginal[0]
                     if uses_score and callback.wants(i) else None)
            z = None if i == last else noise.randn_like(x)
            if from_eps is not None:
                x = from_eps(x, eps, rows, i, z)
            else:  # s = -eps_hat / sigma_t from the table
                score = eps * rows["neg_inv_sigma:tensor"][i] if uses_score else x
                x = self.predictor.step(x, score, rows, i, z)
        return x

"""The math layer shared by every Gaussian noise process.

One view of every process (docs/processes.md)::

    x_t = alpha(t) * x_0 + sigma(t) * eps,    eps ~ N(0, I),    t in [0, 1]

A concrete process states its marginal coefficients ``alpha(t)`` and ``sigma(t)``, its forward
SDE ``dx = f(x, t) dt + g(t) dw`` and its prior. Everything else here is derived from those once:
the marginal sampler, the signal-to-noise ratio, the transition ``q(x_t | x_s)`` between any two
times and its Euler-Maruyama discretisation, the posterior ``q(x_s | x_t, x_0)``, the reverse-time
SDE drift and the probability-flow ODE drift (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", eqs. 6 and 13), the conversions between network parameterisations, and the
variational-bound terms (Ho et al. 2020, eq. 5) built from :mod:`diffusers_kit.processes.gaussian`.

All functions take ``t`` as a tensor of shape ``(B,)`` (one time per sample) and broadcast
coefficients over the data dimensions with :func:`expand`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusers_kit.processes import gaussian

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

PREDICTIONS = ("eps", "score", "x0", "v", "mu", "velocity")


def widen(t: Tensor) -> Tensor:
    """``t`` in float64, unless its device lacks float64 (Apple's MPS): coefficients that are
    differences of nearby numbers (transition and posterior variances) need the precision."""
    return t if t.device.type == "mps" else t.double()


def posterior_of(a: Tensor, b2: Tensor, alpha_s: Tensor, sigma_s: Tensor, sigma_t: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_t, c_0, var)`` of ``q(x_s | x_t, x_0)`` from the transition ``q(x_t | x_s) =
    N(a x_s, b2)`` and the marginals (Bayes' rule; Kingma et al. 2021, eq. 29 and following)::

        c_t = a sigma_s^2 / sigma_t^2,   c_0 = alpha_s b2 / sigma_t^2,
        var = b2 sigma_s^2 / sigma_t^2

    With ``sigma_s = 0`` (a sampler's last move, onto noise level 0) it is ``(0, alpha_s, 0)``:
    the move lands on ``alpha_s x0``.
    """
    ratio = sigma_s**2 / sigma_t**2
    return a * ratio, alpha_s * b2 / sigma_t**2, b2 * ratio


def expand(coefficient: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return coefficient.reshape(coefficient.shape + (1,) * (like.dim() - coefficient.dim()))


class NoiseProcess:
    """Base class of noise processes: ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`drift`, :meth:`diffusion` and the
    prior (:meth:`prior_std`, or override :meth:`prior_sample` / :meth:`prior_log_prob`).
    ``t_min`` is the smallest time samplers integrate to (a positive value avoids the
    singular score at ``t = 0``). Discrete processes (DDPM) set ``num_steps`` to their number of
    steps T (step ``i`` sits at ``t = i / T``); continuous ones leave it ``None``.
    ``default_spacing`` is the time grid the few-step probability-flow solvers take under their
    default ``spacing: auto`` (one of ``uniform``, ``quadratic``, ``edm``, ``log_snr``;
    :mod:`diffusers_kit.solvers.grids`): equal log-SNR steps unless a process knows better.

    **Optional capabilities** — components that need one check for it with :meth:`lacks`, which
    names what is missing (so a plugin process learns it at validation, not mid-run):

    - ``DISCRETE_STEPS`` (``num_steps`` set, ``step_index(t)``): the ``ddpm_*`` objectives;
    - ``NOISE_LADDER`` (``levels()``, ``num_levels``, ``level_times()``): NCSN's annealed
      Langevin dynamics and the ``levels`` time sampling of objectives.
    """

    t_min: float = 0.0
    num_steps: int | None = None
    default_spacing: str = "log_snr"

    DISCRETE_STEPS = ("num_steps", "step_index")
    NOISE_LADDER = ("levels", "num_levels", "level_times")

    def lacks(self, capability: tuple[str, ...]) -> list[str]:
        """The members of ``capability`` (e.g. :attr:`NOISE_LADDER`) this process does not
        provide (``None`` counts as missing); empty when it has them all."""
        return [name for name in capability if getattr(self, name, None) is None]

    # -- marginal -----------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` of ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)``."""
        return self.alpha(t), self.sigma(t)

    def marginal_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``x_t ~ q(x_t | x_0)``; returns ``(x_t, eps)``."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.marginal(t)
        return expand(alpha, x0) * x0 + expand(sigma, x0) * noise, noise

    def log_snr(self, t: Tensor) -> Tensor:
        """``log SNR(t) = log(alpha(t)^2 / sigma(t)^2)`` (Kingma et al. 2021)."""
        alpha, sigma = self.marginal(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``SNR(t) = alpha(t)^2 / sigma(t)^2``."""
        return torch.exp(self.log_snr(t))

    # -- transition between two times ---------------------------------------------------------
    def transition(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of ``q(x_t | x_s) = N(a x_s, b^2 I)`` for ``s < t``.

        For any process with Gaussian marginals driven by a linear SDE (Kingma et al. 2021,
        eq. 3)::

            a = alpha(t) / alpha(s),      b^2 = sigma(t)^2 - a^2 sigma(s)^2

        For DDPM with ``s = (i - 1) / T``, ``t = i / T`` this is ``(sqrt(1 - beta_i),
        sqrt(beta_i))``, the one-step transition of Ho et al. 2020, eq. 2.
        """
        a, b = self.transition_coefficients(widen(t), widen(s))
        return a.to(t.dtype), b.to(t.dtype)

    def transition_coefficients(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """The formula behind :meth:`transition`, in the dtype given (callers pass float64:
        ``b^2`` is a difference of nearby numbers)."""
        alpha_t, sigma_t = self.marginal(t)
        alpha_s, sigma_s = self.marginal(s)
        a = alpha_t / alpha_s
        var = (sigma_t**2 - a**2 * sigma_s**2).clamp_min(0.0)
        return a, var.sqrt()

    def transition_sample(
        self, x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_s)`` (``s < t``): the exact one-step transition."""
        if noise is None:
            noise = torch.randn_like(x_s)
        a, b = self.transition(t, s)
        return expand(a, x_s) * x_s + expand(b, x_s) * noise

    def euler_maruyama_step(
        self, x: Tensor, t: Tensor, dt: Tensor | float, noise: Tensor | None = None
    ) -> Tensor:
        """One Euler-Maruyama step of the forward SDE (the discretisation of Song et al. 2021,
        appendix D): ``x + f(x, t) dt + g(t) sqrt(dt) z``, ``z ~ N(0, I)``, with ``dt > 0``."""
        if noise is None:
            noise = torch.randn_like(x)
        dt = torch.as_tensor(dt, dtype=x.dtype, device=x.device)
        g = expand(self.diffusion(t), x)
        return x + self.drift(x, t) * dt + g * dt.sqrt() * noise

    def previous_time(self, t: Tensor) -> Tensor:
        """The time one step before ``t`` (discrete processes only: ``t - 1 / T``)."""
        if self.num_steps is None:
            raise ValueError(
                f"{type(self).__name__} is continuous: give the earlier time s explicitly"
            )
        return (t - 1.0 / self.num_steps).clamp_min(0.0)

    # -- posterior ------------------------------------------------------------------------------
    def posterior_coefficients(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_t, c_0, var)`` of ``q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, var I)``, ``s < t``.

        Bayes' rule with ``q(x_s | x_0) = N(alpha_s x_0, sigma_s^2)`` and
        ``q(x_t | x_s) = N(a x_s, b^2)`` (Kingma et al. 2021, eq. 29 and following)::

            c_t = a sigma_s^2 / sigma_t^2,   c_0 = alpha_s b^2 / sigma_t^2,
            var = b^2 sigma_s^2 / sigma_t^2

        For DDPM this is Ho et al. 2020, eq. 7: ``c_0 = sqrt(abar_{i-1}) beta_i / (1 - abar_i)``,
        ``c_t = sqrt(alpha_i) (1 - abar_{i-1}) / (1 - abar_i)`` and
        ``var = beta~_i = (1 - abar_{i-1}) beta_i / (1 - abar_i)``.
        Computed in float64 (where the device has it) and returned in ``t``'s dtype.
        """
        dtype, t, s = t.dtype, widen(t), widen(s)
        alpha_s, sigma_s = self.marginal(s)
        sigma_t = self.sigma(t)
        a, b = self.transition_coefficients(t, s)
        coefficients = posterior_of(a, b**2, alpha_s, sigma_s, sigma_t)
        return tuple(c.to(dtype) for c in coefficients)  # type: ignore[return-value]

    def posterior(
        self, x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean (shaped like ``x_t``) and variance (shape ``(B,)``) of ``q(x_s | x_t, x_0)``.

        ``s`` defaults to the previous step of a discrete process (DDPM's ``mu~_t``, ``beta~_t``).
        """
        if s is None:
            s = self.previous_time(t)
        c_t, c_0, var = self.posterior_coefficients(t, s)
        return expand(c_t, x_t) * x_t + expand(c_0, x_t) * x0, var

    def reverse_variance(
        self, t: Tensor, s: Tensor | None = None, kind: str = "posterior"
    ) -> Tensor:
        """Variance of a fixed-variance reverse step ``p(x_s | x_t)`` (Ho et al. 2020, section 3.2):
        ``posterior`` gives ``beta~_t`` (the posterior variance, the lower bound), ``transition``
        gives ``beta_t`` (the one-step forward variance ``b^2``, the upper bound)."""
        if s is None:
            s = self.previous_time(t)
        if kind == "posterior":
            return self.posterior_coefficients(t, s)[2]
        if kind == "transition":
            return self.transition(t, s)[1] ** 2
        raise ValueError(f"unknown reverse variance {kind!r}; expected 'posterior' or 'transition'")

    # -- forward SDE ----------------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Forward SDE drift ``f(x, t)``."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """Forward SDE diffusion coefficient ``g(t)`` (shape ``(B,)``)."""
        raise NotImplementedError

    # -- prior ------------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``p(x_1) = N(0, s^2 I)``."""
        raise NotImplementedError

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``x_1 ~ p(x_1)``."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std() * noise

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """``log p(x_1)`` per sample (sum over data dimensions)."""
        std = self.prior_std()
        d = x[0].numel()
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))

    # -- reverse time (derived once) ------------------------------------------------------------
    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Reverse-time SDE drift ``f(x, t) - g(t)^2 * score`` (Song et al. 2021, eq. 6)."""
        g = expand(self.diffusion(t), x)
        return self.drift(x, t) - g * g * score

    def marginal_rates(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha / dt, d sigma / dt)``. By default from the SDE: with the drift ``f(t) x``
        and ``g^2``, ``alpha' = f alpha`` and ``sigma' = (g^2 + 2 f sigma^2) / (2 sigma)``
        (Kingma et al. 2021, eq. 3 and following). A process whose ``alpha`` reaches 0 (``f``
        infinite there: rectified flow, ``alpha = 1 - t``) states them itself; the probability
        flow's data form (:func:`diffusers_kit.solvers.ode.data_velocity`) needs them there."""
        alpha, sigma = self.marginal(t)
        f = self.drift(torch.ones(len(t), 1, dtype=t.dtype, device=t.device), t)[:, 0]
        g2 = self.diffusion(t) ** 2
        return f * alpha, (g2 + 2.0 * f * sigma**2) / (2.0 * sigma)

    def probability_flow_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift ``f(x, t) - g(t)^2 score / 2`` (Song et al. 2021, eq. 13)."""
        g = expand(self.diffusion(t), x)
        return self.drift(x, t) - 0.5 * g * g * score

    # -- parameterisations ----------------------------------------------------------------------
    def convert(
        self,
        output: Tensor,
        x_t: Tensor,
        t: Tensor,
        source: str,
        target: str,
        s: Tensor | None = None,
        marginal: tuple[Tensor | float, Tensor | float] | None = None,
    ) -> Tensor:
        """Convert a network output between parameterisations of the same ``x_t``.

        With ``x_t = a x_0 + s eps``: ``score = -eps / s``, ``x0 = (x_t - s eps) / a``,
        ``v = a eps - s x_0`` (Salimans & Ho 2022), ``velocity = a' x_0 + s' eps``, the time
        derivative of the path ``a(t) x_0 + s(t) eps`` with ``(x_0, eps)`` held fixed (the
        flow-matching target; Lipman et al. 2022, Liu et al. 2022; ``(a', s')`` from
        :meth:`marginal_rates`), and ``mu = c_t x_t + c_0 x0``, the mean of the posterior
        ``q(x_s | x_t, x0)`` with ``x0`` predicted (Ho et al. 2020, eq. 11; ``s`` defaults to
        the previous step of a discrete process).

        The source gives the pair ``(x0, eps)`` with ``x_t = a x0 + s eps``, each member solved
        for only when the target needs it: ``v`` and ``velocity`` give both directly (a 2 x 2
        system, ``det = a^2 + s^2`` and ``a s' - s a'``), so ``x0`` from them is defined where
        ``a = 0`` (pure noise) as well; from ``eps`` or the score, ``x0`` divides by ``a``.
        ``marginal``: ``(alpha, sigma)`` at ``t`` when the caller has them (a sampler's cached
        grid: no schedule work per step).
        """
        if source == target:
            return output
        if source not in PREDICTIONS:
            raise ValueError(f"unknown prediction {source!r}; expected one of {PREDICTIONS}")
        if target not in PREDICTIONS:
            raise ValueError(f"unknown prediction {target!r}; expected one of {PREDICTIONS}")
        alpha, sigma = (marginal if marginal is not None
                        else (expand(c, x_t) for c in self.marginal(t)))
        rates = None
        if "velocity" in (source, target):
            rates = tuple(expand(c.to(x_t.dtype), x_t) for c in self.marginal_rates(t))
        x0: Tensor | None = None
        eps: Tensor | None = None
        if source == "eps":
            eps = output
        elif source == "score":
            eps = -sigma * output
        elif source == "x0":
            x0 = output
        elif source == "v":
            norm = alpha * alpha + sigma * sigma
            x0 = (alpha * x_t - sigma * output) / norm
            eps = (sigma * x_t + alpha * output) / norm
        elif source == "velocity":
            assert rates is not None
            d_alpha, d_sigma = rates
            det = alpha * d_sigma - sigma * d_alpha
            x0 = (d_sigma * x_t - sigma * output) / det
            eps = (alpha * output - d_alpha * x_t) / det
        else:  # mu
            c_t, c_0, _ = self.posterior_coefficients(t, self.previous_time(t) if s is None else s)
            x0 = (output - expand(c_t, x_t) * x_t) / expand(c_0, x_t)
        if target in ("eps", "score", "v", "velocity") and eps is None:
            assert x0 is not None
            eps = (x_t - alpha * x0) / sigma
        if target in ("x0", "v", "velocity", "mu") and x0 is None:
            assert eps is not None
            x0 = (x_t - sigma * eps) / alpha
        if target == "eps":
            return eps  # type: ignore[return-value]
        if target == "score":
            return -eps / sigma  # type: ignore[operator]
        if target == "x0":
            return x0  # type: ignore[return-value]
        if target == "v":
            return alpha * eps - sigma * x0  # type: ignore[operator]
        if target == "velocity":
            assert rates is not None
            return rates[0] * x0 + rates[1] * eps  # type: ignore[operator]
        c_t, c_0, _ = self.posterior_coefficients(t, self.previous_time(t) if s is None else s)
        return expand(c_t, x_t) * x_t + expand(c_0, x_t) * x0

    # -- variational bound (Ho et al. 2020, eq. 5) ------------------------------------------------
    def prior_kl(self, x0: Tensor) -> Tensor:
        """``L_T = KL(q(x_1 | x_0) || p(x_1))`` per sample, in nats (summed over dimensions)."""
        t = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)
        alpha, sigma = (expand(c, x0) for c in self.marginal(t))
        kl = gaussian.normal_kl(alpha * x0, sigma**2, torch.zeros_like(x0), self.prior_std() ** 2)
        return kl.flatten(1).sum(1)

    def expected_prior_kl(self, data_var: float = 1.0) -> float:
        """Prior mismatch per data dimension: ``E KL(q(x_1 | x_0) || p(x_1))`` over data with
        ``E x_0^2 = data_var``, in nats. ``L_T`` is quadratic in ``x_0``, so the average over the
        two points ``x_0 = +-sqrt(data_var)`` is the exact expectation."""
        x0 = torch.tensor([[-1.0], [1.0]], dtype=torch.float64) * math.sqrt(data_var)
        return float(self.prior_kl(x0).mean())

    def posterior_kl(
        self,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        model_mean: Tensor,
        model_var: Tensor | float,
        s: Tensor | None = None,
    ) -> Tensor:
        """``L_{t-1} = KL(q(x_s | x_t, x_0) || N(model_mean, model_var I))`` per sample, in nats.

        ``model_var`` is a float, a per-sample ``(B,)`` tensor or a tensor shaped like ``x_t``.
        """
        mean, var = self.posterior(x_t, x0, t, s)
        model_var = torch.as_tensor(model_var, dtype=x_t.dtype, device=x_t.device)
        if model_var.dim() == 1:
            model_var = expand(model_var, x_t)
        kl = gaussian.normal_kl(mean, expand(var, x_t), model_mean, model_var)
        return kl.flatten(1).sum(1)

    @staticmethod
    def decoder_nll(
        x0: Tensor, model_mean: Tensor, model_var: Tensor | float, *, bins: int | None = 256
    ) -> Tensor:
        """``L_0 = -log p(x_0 | x_1)`` per sample, in nats.

        With ``bins`` (default 256, 8-bit data scaled to ``[-1, 1]``) the decoder is the
        discretized Gaussian of Ho et al. 2020, eq. 13; with ``bins=None`` it is the continuous
        Gaussian density ``N(x_0; model_mean, model_var I)``.
        """
        model_var = torch.as_tensor(model_var, dtype=x0.dtype, device=x0.device)
        if model_var.dim() == 1:
            model_var = expand(model_var, x0)
        if bins is None:
            log_p = gaussian.normal_log_prob(x0, model_mean, model_var)
        else:
            log_p = gaussian.discretized_gaussian_log_likelihood(
                x0, model_mean, model_var, bins=bins
            )
        return -log_p.flatten(1).sum(1)

    def time_grid(self, steps: int, *, device: torch.device | str | None = None) -> Tensor:
        """``steps + 1`` decreasing times from 1 to ``t_min`` (the default sampling grid)."""
        return torch.linspace(1.0, self.t_min, steps + 1, device=device, dtype=torch.float64)

"""Guidance by a measurement ``y = A(x_0) + noise`` through a forward model: the inverse-problem
methods (kind ``guidance``: ``replacement``, ``diffpir``, ``ddnm``, ``ddnm_plus``, ``pigdm``,
``dps``; ``ddrm``, a sampler's step in the SVD basis, is :mod:`diffusers_kit.guidance.ddrm`).

Every method holds **one** forward model (kind ``forward_model``, ``diffusers_kit/forward_models``):
the same object simulates the measurement (``dkit restore``, :func:`diffusers_kit.restore.restore`)
and computes the guidance, so the two can never disagree. The measurement of each sample is
bound to the guided model with :meth:`ScoreModel.guided` (``measurements=``) and sliced with the
batch like labels.

Notation: ``x0_hat(x_t)`` is the model's denoised estimate, ``sigma = sigma_t / alpha_t`` the
noise level and ``r_t^2 = c^2 sigma^2 / (c^2 + sigma^2)`` the variance of ``x_0`` given ``x_t``
for a Gaussian prior ``N(., c^2 I)`` (``c``: ``data_std``). With ``A = U diag(s) V^T`` the
operator's SVD, the Gaussian measurement likelihood of ``x0_hat`` has covariance
``r_t^2 A A^T + sigma_y^2 I = U diag(r_t^2 s^2 + sigma_y^2) U^T`` — diagonal in the SVD basis,
so every inverse below is an elementwise division.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.guidance.base import (
    Evaluate,
    Guidance,
    Interval,
    TakesStep,
    add_score,
    noise_level,
    replace_x0,
)
from diffusers_kit.hookspecs import OptionError

if TYPE_CHECKING:
    from diffusers_kit.latent import DecodedOperator
    from diffusers_kit.model import ScoreModel

DataStd = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]

MEASURED = 1e-6
"""Singular values below this share of the largest count as zero: directions the measurement
does not see (the SVD methods leave them to the model)."""


def measured_directions(s: torch.Tensor) -> torch.Tensor:
    """Which singular values ``s`` count as measured (``s > MEASURED * max(s)``)."""
    return s > MEASURED * s.max()


class MeasurementGuidance(Guidance):
    """Base of the terms that condition on a measurement through ``operator``.

    Args:
        operator: the forward model ``y = A(x) + noise`` (its ``sigma_y`` in data units).
        data_std: ``c``, the prior's scale in ``r_t^2`` (1 for unit-variance data).
        interval: act only for noise levels ``sigma/alpha`` in ``[lo, hi]``.
    """

    needs_labels = False
    needs_measurement = True

    @staticmethod
    def x0_with_grad(evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Under ``torch.enable_grad()``: ``(x_g, output, x0_hat)``, ``x_g`` a copy of ``x`` that
        requires a gradient, the output at it and the x0 prediction from it (for the methods
        that differentiate through the denoiser: ΠGDM, DPS)."""
        xg = x.detach().requires_grad_(True)
        output = evaluate(xg, t, y)
        prediction, _ = model.split(output)
        return xg, output, model.convert(prediction, xg, t, "x0")

    def __init__(self, operator: ForwardModel, data_std: DataStd = 1.0,
                 interval: Interval | None = None) -> None:
        super().__init__(interval)
        self.operator = operator
        self.data_std = data_std
        self._decoded: DecodedOperator | None = None  # the operator through a decoder

    needs_svd = False  # a method that works in the operator's SVD basis says so
    needs_pinv = False  # a method that applies the operator's pseudo-inverse A^+ says so
    needs_gaussian_noise = False  # a method whose formula assumes N(y; A x, sigma_y^2 I)

    def check(self, model: ScoreModel) -> str | None:
        if (self.needs_svd or self.needs_pinv) and model.autoencoder is not None:
            return ("a pixel-space model: a latent model measures x0_hat through its decoder, "
                    f"which is not linear (no {'SVD' if self.needs_svd else 'pseudo-inverse'})"
                    ": use dps")
        if self.needs_svd and not self.operator.has_svd:
            return f"an operator with an SVD ({self.operator.lacks()}: use dps)"
        if self.needs_pinv and not (self.operator.linear and self.operator.has_pinv):
            name = type(self.operator).__name__
            why = (f"{name} is nonlinear" if not self.operator.linear else
                   f"{name} has no SVD and d = {self.operator.d} is too large for its dense "
                   "matrix")
            return f"a linear operator with a pseudo-inverse ({why}: use dps)"
        if self.needs_gaussian_noise and not self.operator.noise.gaussian:
            return (f"Gaussian measurement noise ({type(self.operator).__name__} has "
                    f"{self.operator.noise.describe()}: use dps)")
        shape = tuple(getattr(model.network, "data_shape", ()) or ())
        if model.autoencoder is not None:  # the operator measures decoded images
            shape = tuple(model.autoencoder.data_shape)
        if shape and tuple(self.operator.data_shape) != shape:
            return (f"an operator for data of shape {shape} (this one was built for "
                    f"{tuple(self.operator.data_shape)})")
        return None

    def forward_operator(self, model: ScoreModel) -> ForwardModel:
        """The operator as ``model``'s state sees it: ``operator`` itself, or for a latent
        model ``A(decode(z))`` (:class:`diffusers_kit.latent.DecodedOperator`, built once)."""
        if model.autoencoder is None:
            return self.operator
        from diffusers_kit.latent import DecodedOperator

        cached = self._decoded
        if cached is None or cached.autoencoder is not model.autoencoder:
            cached = DecodedOperator(self.operator, model.autoencoder)
            self._decoded = cached
        return cached

    def measurement(self, model: ScoreModel, x: torch.Tensor) -> torch.Tensor:
        y = model.measurements
        if y is None:
            raise ValueError(f"{type(self).__name__} needs a measurement: use dkit restore, a "
                             "spec's restore section or diffusers_kit.restore.restore")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{y.shape[0]} measurements bound for a batch of {x.shape[0]}")
        return y.to(device=x.device, dtype=x.dtype)

    def posterior_variance(self, model: ScoreModel, t: torch.Tensor) -> torch.Tensor:
        """``r_t^2 = c^2 sigma^2 / (c^2 + sigma^2)`` per sample, ``sigma = sigma_t / alpha_t``."""
        level = noise_level(model, t).double()
        c2 = self.data_std**2
        return c2 * level**2 / (c2 + level**2)

    def singulars(self, like: torch.Tensor) -> torch.Tensor:
        """The operator's singular values on ``like``'s device and dtype (cached there)."""
        return self.operator.singulars(like=like)

    def precision_weights(self, r2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``s / (r_t^2 s^2 + sigma_y^2)`` per sample and singular value, ``(B, r)``: the SVD-
        basis form of ``A^T (r_t^2 A A^T + sigma_y^2 I)^{-1}`` (the denominator floored at
        1e-12 for a noiseless measurement at ``t -> 0``)."""
        s = self.singulars(r2)
        denominator = r2[:, None] * s**2 + self.operator.sigma_y**2
        return (s / denominator.clamp_min(1e-12)).to(dtype)

    def spectral(self, residual: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``V [weights * (U^T residual)]``: a measurement-space residual weighted in the SVD
        basis and brought back to data space."""
        z = self.operator.Ut(residual)
        r = weights.shape[1]
        full = z.new_zeros(z.shape[0], math.prod(self.operator.data_shape))
        full[:, :r] = weights * z[:, :r]
        return self.operator.V(full)


class Replacement(MeasurementGuidance):
    """Data consistency of the denoised estimate: score-SDE imputation (Song et al. 2021,
    app. I.2) done on ``x0_hat`` for any operator, process and sampler.

    ``x0_hat <- x0_hat + r_t^2 A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)``: the
    posterior mean of ``x_0`` given ``x0_hat`` and ``y`` when ``x_0 | x_t`` is taken as
    ``N(x0_hat, r_t^2 I)``. Without measurement noise it is ``x0_hat + A^+ (y - A x0_hat)``
    (the range / null-space decomposition of Wang et al. 2023): the known part becomes exactly
    ``y`` and the rest is the model's. For inpainting that is the replacement of the known
    pixels — but through ``x0_hat``, so every solver's own update then noises ``y`` correctly to
    the next time (DDIM keeps the known pixels on ``alpha_s y + sigma_s eps``, ancestral
    sampling draws them from ``q(x_s | x_t, x_0 = y)``), the start is the prior, and the final
    denoise returns ``y`` exactly on the known part (how this differs from the imputation as
    first published: ``docs/inverse.md``). No network gradient: cheap.

    Args:
        operator: the forward model.
        data_std: ``c`` in ``r_t^2`` (only matters with measurement noise).
        interval: act only for noise levels in ``[lo, hi]``.
    """

    needs_svd = True
    needs_gaussian_noise = True

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        measured = self.measurement(model, x)
        s = self.singulars(x)
        if self.operator.sigma_y == 0:  # the limit r^2 s / (r^2 s^2) = 1 / s: A^+ (y - A x0)
            kept = measured_directions(s)  # directions A cannot see stay the model's
            weights = torch.where(kept, 1 / s.clamp_min(1e-300), 0.0).expand(x.shape[0], -1)
        else:
            r2 = self.posterior_variance(model, t)[:, None].to(x.dtype)
            weights = r2 * s / (r2 * s**2 + self.operator.sigma_y**2)
        return replace_x0(model, evaluate(x, t, y), x, t, lambda x0: x0 + self.spectral(
            measured - self.operator.A(x0), weights.to(x0.dtype)))


class DiffPIR(Replacement):
    """DiffPIR's data step (Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool 2023, eqs. 12-13):
    ``x0_hat`` is replaced by the proximal point

    ``argmin_x ||y - A x||^2 + rho_t ||x - x0_hat||^2 = x0_hat + A^T (A A^T + rho_t I)^{-1}
    (y - A x0_hat)``, ``rho_t = lam sigma_y^2 / sigma^2``, ``sigma = sigma_t / alpha_t``,

    which is :class:`Replacement`'s update with its ``r_t^2`` taken as ``sigma^2 / lam``
    (replacement: ``sigma_y^2 / r_t^2`` in the same place): so ``lam = 1`` is replacement for a
    prior of unbounded scale, and without measurement noise it is replacement exactly (the
    pseudo-inverse projection, as in DDNM). The paper's sampling step after it, DDIM-like with
    a share ``zeta`` of fresh noise, is the solver's: with DDIM (``eta = 0``) this is DiffPIR
    with ``zeta = 0``. Exact on no prior for all ``t`` with ``sigma_y > 0`` (a constant ``lam``
    cannot follow ``c^2 sigma^2 / (c^2 + sigma^2)``); its bias on a Gaussian prior is
    measured in ``docs/inverse.md``.

    Args:
        operator: the forward model (with an SVD).
        lam: ``lambda``, the weight of the prior in ``rho_t`` (the paper tunes it per task).
        interval: act only for noise levels in ``[lo, hi]``.
    """

    def __init__(self, operator: ForwardModel,
                 lam: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1.0,
                 interval: Interval | None = None) -> None:
        super().__init__(operator, 1.0, interval)
        self.lam = lam

    def posterior_variance(self, model: ScoreModel, t: torch.Tensor) -> torch.Tensor:
        """``sigma^2 / lam``: the variance that makes replacement's step DiffPIR's."""
        return noise_level(model, t).double() ** 2 / self.lam


class DDNM(MeasurementGuidance):
    """The range / null-space decomposition of the denoised estimate (DDNM; Wang, Yu & Zhang
    2023, eq. 13 and alg. 1):

    ``x0_hat <- A^+ y + (I - A^+ A) x0_hat = x0_hat + A^+ (y - A x0_hat)``:

    the range-space part of ``x0_hat`` is replaced by the one the measurement fixes, the null-
    space part is the model's. It uses the operator's pseudo-inverse (``A^+``, which an operator
    with only ``A`` and its adjoint has through its dense matrix on small data), so it needs a
    linear operator with one, not an SVD. The paper's sampling step after it is DDPM's
    ancestral step, i.e. the solver's (any solver; DDIM with ``eta = 1`` is the paper's).
    Without measurement noise it is :class:`Replacement`'s update (which takes it through the
    SVD) and exact on a Gaussian prior: ``A x = y`` to working precision and the null space
    sampled as the prior's (tested). With noise it still projects onto the noisy ``y`` (the
    restorations keep the measurement's noise in the range space: consistency ``~0``, not
    ``sigma_y``); the paper's DDNM+ scales the correction and the sampler's noise per
    direction for that: :class:`DDNMPlus`.

    Args:
        operator: the forward model (linear, with a pseudo-inverse).
        interval: act only for noise levels in ``[lo, hi]``.
    """

    needs_pinv = True

    def __init__(self, operator: ForwardModel, interval: Interval | None = None) -> None:
        super().__init__(operator, 1.0, interval)

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        measured = self.measurement(model, x)
        return replace_x0(model, evaluate(x, t, y), x, t, lambda x0: x0 + self.operator.pinv(
            measured - self.operator.A(x0)))


class DDNMPlus(TakesStep, DDNM):
    """DDNM+ (Wang, Yu & Zhang 2023, sec. 3.3): DDNM's correction scaled per direction so
    that the measurement's noise is counted in the sampler's own, on DDPM's ancestral step
    ``x_s ~ N(c_t x_t + c_0 x0_hat', Phi)`` (``q(x_s | x_t, x_0)``'s coefficients, ``sd^2`` its
    variance). In the operator's SVD basis, with ``tau_i = sigma_y / s_i`` the noise of
    ``y_bar_i = (U^T y)_i / s_i``:

    - ``sd >= c_0 tau_i``: ``x0_bar_i' = y_bar_i`` (DDNM's correction in full) and the fresh
      noise is cut to ``sd^2 - (c_0 tau_i)^2``, as ``y_bar``'s noise, carried by ``c_0``,
      supplies the rest;
    - ``sd < c_0 tau_i``: the correction scaled by ``lambda_i = sd / (c_0 tau_i)``, no fresh
      noise;
    - unmeasured directions: ``x0_hat`` and noise ``sd^2``.

    Like DDRM it is a move, not a prediction: it ``takes_step`` (with ``ddim``, whose grid
    gives ``c_t``, ``c_0`` and ``sd^2`` of the move, so its ``eta`` does not matter) and keeps
    the unconditional ``x0_hat``. It needs an SVD and Gaussian noise. Without noise it is DDNM
    with DDPM's ancestral step (tested: the same samples as ``ddnm`` with ``ddim, eta: 1``).
    Not an exact posterior sampler with noise: its bias on a Gaussian prior is measured in
    ``docs/inverse.md``. The paper's time-travel trick (RePaint's jumps) is not included.

    Args:
        operator: the forward model (with an SVD).
    """

    needs_svd = True
    needs_gaussian_noise = True

    def __init__(self, operator: ForwardModel) -> None:
        super().__init__(operator, None)

    def step(self, model: ScoreModel, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             move: Mapping[str, float],
             randn_like: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """The ancestral move with the scaled correction and noise of the class doc."""
        operator = self.operator
        sd, c0 = math.sqrt(move["posterior_var"]), move["c_0"]
        x0_bar = operator.Vt(x0)
        s = self.singulars(x0_bar)
        r = s.numel()
        kept = measured_directions(s)
        safe = torch.where(kept, s, torch.ones_like(s))
        y_bar = operator.Ut(self.measurement(model, x))[:, :r] / safe
        carried = c0 * operator.sigma_y / safe  # c_0 tau_i: y_bar's noise in the mean
        full = kept & (sd >= carried)
        scale = torch.where(full, torch.ones_like(s),
                            torch.where(kept, sd / carried.clamp_min(1e-300),
                                        torch.zeros_like(s)))
        variance = torch.where(full, sd**2 - carried**2,
                               torch.where(kept, torch.zeros_like(s), torch.full_like(s, sd**2)))
        row = x0_bar[:, :r] - scale * (x0_bar[:, :r] - y_bar)
        out = c0 * torch.cat([row, x0_bar[:, r:]], dim=1)
        if randn_like is not None and sd > 0:
            spread = torch.cat([variance.clamp_min(0).sqrt(),
                                torch.full((x0_bar.shape[1] - r,), sd, dtype=s.dtype,
                                           device=s.device)])
            out = out + spread * operator.Vt(randn_like(x))
        return move["c_t"] * x + operator.V(out)


class PiGDM(MeasurementGuidance):
    """Pseudo-inverse guided diffusion (ΠGDM; Song, Vahdat, Mardani & Kautz 2023, eq. 7):

    ``grad log p(y | x_t) ~ J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)``,
    ``J = d x0_hat / d x_t``:

    one vector-Jacobian product through the network per step. Exact when ``x_0 | x_t`` is
    Gaussian with covariance ``r_t^2 I`` — a Gaussian prior ``N(0, c^2 I)`` with ``c = data_std``
    (tested); an approximation otherwise.

    Args:
        operator: the forward model.
        scale: multiplies the term (1: as derived).
        data_std: ``c`` in ``r_t^2``.
        interval: act only for noise levels in ``[lo, hi]``.
    """

    differentiates = True
    needs_svd = True
    needs_gaussian_noise = True

    def __init__(self, operator: ForwardModel,
                 scale: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 1.0,
                 data_std: DataStd = 1.0, interval: Interval | None = None) -> None:
        super().__init__(operator, data_std, interval)
        self.scale = scale

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        measured = self.measurement(model, x)
        with torch.enable_grad():
            xg, output, x0 = self.x0_with_grad(evaluate, model, x, t, y)
            weights = self.precision_weights(self.posterior_variance(model, t), x0.dtype)
            direction = self.spectral(measured - self.operator.A(x0.detach()), weights)
            (grad,) = torch.autograd.grad(x0, xg, grad_outputs=direction)
        return add_score(model, output.detach(), x, t, self.scale * grad)


class DPS(MeasurementGuidance):
    """Diffusion posterior sampling (Chung, Kim, McCann, Klasky & Ye 2023, eq. 16 and alg. 1):
    ``p(y | x_t)`` is replaced by ``p(y | x0_hat(x_t))``, and its gradient is taken through the
    network,

    ``grad log p(y | x_t) ~ -zeta_t grad_x ||y - A(x0_hat(x_t))||^2``,

    an isotropic step on the measurement misfit of ``x0_hat``, whatever the operator. Two
    step sizes ``zeta_t`` (``step``):

    - ``likelihood`` (default): ``zeta_t = zeta / (2 (sigma_y^2 + r_t^2))``, the Gaussian
      likelihood of ``x0_hat`` with its variance widened by ``r_t^2`` so that it stays finite
      for a noiseless measurement and is a score for every solver; for Poisson noise the
      variance at the measurement takes ``sigma_y^2``'s place (the paper's eq. 17 weighting:
      :meth:`~diffusers_kit.forward_models.noise.NoiseModel.widened_log_likelihood`);
    - ``normalised``: the paper's ``zeta_t = zeta / ||y - A(x0_hat)||`` (sec. 4; its Gaussian
      case, used for any noise), which it applies as a displacement of the state after each
      ancestral step; here the displacement is carried to score units by Tweedie's
      ``sigma_t^2 / alpha_t`` (the term moves ``x0_hat`` by
      ``-zeta grad ||y - A x0_hat||^2 / ||y - A x0_hat||`` at every evaluation), so that it
      acts alike under every solver. Its ``zeta`` is therefore not the paper's (whose effect
      grows with the 1,000 ancestral steps it took).

    In the SVD basis the likelihood step weights the residual by ``s / (sigma_y^2 + r_t^2)``
    where the exact Gaussian-prior likelihood (ΠGDM, :class:`PiGDM`) weights it by
    ``s / (s^2 r_t^2 + sigma_y^2)``: the two agree when every singular value is 1 (inpainting,
    denoising) and, for others, only while ``r_t >> sigma_y`` (then DPS's step is ``s^2``
    times ΠGDM's). So DPS is exact on an isotropic Gaussian prior only for such operators;
    the bias otherwise is measured in ``docs/inverse.md``. ``zeta`` trades consistency for
    realism.

    Args:
        operator: the forward model.
        zeta: the step scale (1 with ``step: likelihood``: the likelihood as written).
        step: ``likelihood`` or ``normalised`` (the paper's ``zeta / ||y - A x0_hat||``).
        data_std: ``c`` in ``r_t^2`` (``likelihood`` only).
        interval: act only for noise levels in ``[lo, hi]``.
    """

    differentiates = True

    def __init__(self, operator: ForwardModel,
                 zeta: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 1.0,
                 step: Literal["likelihood", "normalised"] = "likelihood",
                 data_std: DataStd = 1.0, interval: Interval | None = None) -> None:
        super().__init__(operator, data_std, interval)
        if step not in ("likelihood", "normalised"):
            raise OptionError("step", "likelihood or normalised", step)
        self.zeta = zeta
        self.step = step

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        measured = self.measurement(model, x)
        with torch.enable_grad():
            xg, output, x0 = self.x0_with_grad(evaluate, model, x, t, y)
            (grad,) = torch.autograd.grad(self.objective(model, t, measured, x0).sum(), xg)
        return add_score(model, output.detach(), x, t, grad)

    def objective(self, model: ScoreModel, t: torch.Tensor, measured: torch.Tensor,
                  x0: torch.Tensor) -> torch.Tensor:
        """What DPS ascends, per sample: ``zeta`` times the operator's noise log-likelihood of
        ``x0_hat`` widened by ``r_t^2`` (:meth:`NoiseModel.widened_log_likelihood`; Gaussian
        noise: ``-||y - A x0_hat||^2 / (2 (sigma_y^2 + r_t^2))``), or the normalised step's
        ``-zeta_t ||y - A x0_hat||^2``."""
        a = self.forward_operator(model).A(x0)
        if self.step == "likelihood":
            extra = self.posterior_variance(model, t).to(x0.dtype)
            return self.zeta * self.operator.noise.widened_log_likelihood(measured, a, extra)
        misfit = (measured - a).flatten(1).pow(2).sum(1)
        alpha, sigma = model.process.marginal(t)
        tweedie = (alpha / sigma**2).to(x0.dtype)  # a score increment g moves x0_hat by s^2/a g
        return -self.zeta * tweedie * misfit / misfit.detach().sqrt().clamp_min(1e-12)


__all__ = [
    "DDNM",
    "DPS",
    "MEASURED",
    "DDNMPlus",
    "DiffPIR",
    "MeasurementGuidance",
    "PiGDM",
    "Replacement",
    "measured_directions",
]

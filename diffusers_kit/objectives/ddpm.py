"""DDPM objectives (Ho et al. 2020; Nichol & Dhariwal 2021) on a discrete process's steps.

With ``t = i / T``, ``i`` uniform on ``{1..T}``, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``:

* ``ddpm_simple`` — L_simple (Ho et al. 2020, eq. 14): ``|| target - target_theta ||^2``, mean
  over dimensions, where the target is what the network predicts (``eps``: the noise, as in the
  paper; ``x0``; ``v = alpha eps - sigma x0`` of Salimans & Ho 2022; ``mu``: the posterior mean
  mu~_t, the unweighted mean-prediction row of the paper's Table 2).
* ``ddpm_vlb`` — the variational bound (eq. 5) ``L = L_T + sum_{t>1} L_{t-1} + L_0``, estimated
  per example as ``L_T + T * L_{i-1}`` (for i > 1, ``L_{i-1} = KL(q(x_{i-1} | x_i, x_0) ||
  p_theta(x_{i-1} | x_i))``; for i = 1 the decoder ``-log p_theta(x_0 | x_1)``, eq. 13), in bits per
  dimension. The reverse mean is the posterior mean with the predicted x0 (eq. 11, any
  parameterisation), the variance fixed to ``sigma_t^2 = beta~_t`` or ``beta_t``
  (section 3.2), or learned: ``log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t``,
  ``frac = (v + 1) / 2`` from the network's second half of channels (Nichol & Dhariwal, eq. 15).
  For an eps network with fixed variance, ``L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
  || eps - eps_theta ||^2 + C`` (eq. 12): L_simple with a weight per step.
* ``ddpm_hybrid`` — ``L_simple + lambda L_vlb`` with lambda = 0.001 and the mean's gradient stopped
  inside ``L_vlb``, so that L_vlb trains only the variance (Nichol & Dhariwal 2021, section 3.1).

``beta~_1 = 0``: a learned variance's lower bound at step 1 is the clipped ``beta~_2`` (Nichol &
Dhariwal 2021's ``posterior_log_variance_clipped``), so ``v`` gets a gradient there too; the fixed
``beta_tilde`` variance keeps ``beta_1`` for its decoder at step 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import Objective, mean_dims
from diffusers_kit.processes import gaussian
from diffusers_kit.processes.base import expand

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess

Tensor = torch.Tensor
TARGETS = ("eps", "x0", "v", "mu")


def true_target(process: NoiseProcess, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor,
                target: str) -> Tensor:
    """The regression target of each parameterisation at ``x_t = alpha x0 + sigma eps``."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "v":
        alpha, sigma = (expand(c, x0) for c in process.marginal(t))
        return alpha * noise - sigma * x0
    if target == "mu":
        return process.posterior(x_t, x0, t)[0]
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def reverse_log_variance(process: NoiseProcess, t: Tensor, variance: str,
                         v: Tensor | None = None) -> Tensor:
    """``log sigma_t^2`` of ``p(x_{t-1} | x_t)``: fixed ``beta~_t`` / ``beta_t`` (shape ``(B,)``),
    or learned from ``v`` (shaped like ``v``)."""
    beta = process.reverse_variance(t, kind="transition")
    beta_tilde = process.reverse_variance(t, kind="posterior")
    log_beta = beta.log()
    # beta~_1 = 0: step 1 takes beta~_2, the step above's (Nichol & Dhariwal's clipped log
    # variance), so that a learned v still moves the decoder's variance at step 1
    step = 1.0 / process.num_steps  # type: ignore[operator]
    above = process.reverse_variance((t + step).clamp(max=1.0), kind="posterior")
    if variance == "beta":
        return log_beta
    if variance == "beta_tilde":  # fixed: beta_1 at step 1, as Ho et al.'s eq. 12 weights
        return gaussian.clipped_log_variance(beta_tilde, beta)
    assert v is not None, "a learned variance needs the network's v output"
    lower = gaussian.clipped_log_variance(beta_tilde, torch.where(above > 0, above, beta))
    return gaussian.learned_log_variance(v, expand(log_beta, v), expand(lower, v))


def vlb_term(process: NoiseProcess, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor,
             log_var: Tensor, *, bins: int | None) -> Tensor:
    """``L_{i-1}`` (i > 1) or ``L_0`` (i = 1) per example, in nats; ``(B,)``."""
    first = process.step_index(t) == 1  # type: ignore[attr-defined]
    var = log_var.exp()
    if var.dim() == 1:
        var = expand(var, x_t)
    mean_q, var_q = process.posterior(x_t, x0, t)
    # beta~_1 = 0: give step-1 rows a harmless value; their KL is not used
    var_q = torch.where(first, torch.ones_like(var_q), var_q)
    kl = gaussian.normal_kl(mean_q, expand(var_q, x_t), model_mean, var).flatten(1).sum(1)
    # and evaluate the decoder at a harmless mean for the other rows (no NaN gradients)
    rows = expand(first, x0)
    decoder = process.decoder_nll(x0, torch.where(rows, model_mean, x0), var, bins=bins)
    return torch.where(first, decoder, kl)


class _DDPMObjective(Objective):
    _tables: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor]]
    ddp_ready = True  # one forward through the model, one ordinary backward

    def marginal_at_steps(self, process: NoiseProcess, t: Tensor, like: Tensor,
                          index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(alpha_i, sigma_i)`` of the steps ``i = t T`` from a table built once per process,
        device and dtype (from ``process.marginal`` in float64), shaped to broadcast on ``like``."""
        if not hasattr(self, "_tables"):
            self._tables = {}
        key = (id(process), like.device, like.dtype)
        if key not in self._tables:
            steps = process.num_steps
            grid = torch.arange(steps + 1, dtype=torch.float64) / steps
            alpha, sigma = process.marginal(grid)
            self._tables = {key: (alpha.to(like.device, like.dtype),
                                  sigma.to(like.device, like.dtype))}
        alpha, sigma = self._tables[key]
        if index is None:
            index = torch.round(t * process.num_steps).long()
        return expand(alpha[index], like), expand(sigma[index], like)

    def noised(self, process: NoiseProcess, x0: Tensor, t: Tensor, noise: Tensor,
               index: Tensor | None = None) -> Tensor:
        alpha, sigma = self.marginal_at_steps(process, t, x0, index)
        return alpha * x0 + sigma * noise

    def predicted(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                  labels: Tensor | None, index: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x_t, prediction, v)``: the noised ``x_t`` and the network's two halves there
        (``v`` None unless it learns its variance)."""
        x_t = self.noised(model.process, x0, t, noise, index)
        prediction, v = model.split(model(x_t, t, labels))
        return x_t, prediction, v

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if reason := super().check(process, network):
            return reason
        if missing := process.lacks(process.DISCRETE_STEPS):
            return (f"a discrete process with steps i / T (ddpm or constant_sigma); this one "
                    f"lacks {', '.join(missing)}")
        return None

    def draw(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor]:
        steps = model.process.num_steps
        assert steps is not None
        # the same draws as dsm.step_times, keeping the integer steps for the table lookup
        index = torch.randint(1, steps + 1, (x0.shape[0],), device=x0.device,
                              generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return index, noise

    def loss(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
             labels: Tensor | None = None) -> Tensor:
        index, noise = self.draw(model, x0, generator)
        t = index.float() / model.process.num_steps
        return self.per_example(model, x0, t, noise, labels, index).mean()

    def per_example(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                    labels: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """The loss per example at times ``t = index / T`` (``index`` saves a rounding)."""
        raise NotImplementedError


def _simple(model: ScoreModel, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor,
            prediction: Tensor, target: str) -> Tensor:
    own = model.network.prediction
    goal = own if target == "auto" else target
    value = prediction if goal == own else model.convert(prediction, x_t, t, goal)
    return mean_dims((value - true_target(model.process, x0, x_t, t, noise, goal)).pow(2))


def _vlb_bits(model: ScoreModel, x0: Tensor, x_t: Tensor, t: Tensor, prediction: Tensor,
              v: Tensor | None, variance: str, bins: int | None) -> Tensor:
    process = model.process
    mean = model.convert(prediction, x_t, t, "mu")
    log_var = reverse_log_variance(process, t, variance, v)
    term = vlb_term(process, x0, x_t, t, mean, log_var, bins=bins)
    nats = process.prior_kl(x0) + process.num_steps * term
    return nats / (x0[0].numel() * math.log(2.0))


class SimpleLoss(_DDPMObjective):
    """DDPM's L_simple: unweighted MSE of the network's prediction (Ho et al. 2020, eq. 14).

    Args:
        target: what to regress: ``auto`` (what the network predicts: eps gives L_simple, mu
            gives the ||mu~ - mu~_theta||^2 row of Table 2), or ``eps``, ``x0``, ``v``, ``mu``
            (the network's output converted first).
    """

    def __init__(self, target: Literal["auto", "eps", "x0", "v", "mu"] = "auto") -> None:
        self.target = target

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        reason = super().check(process, network)
        if reason is None and network.learned_variance:
            return ("a network without learned_variance (ddpm_simple does not train the "
                    "variance: use ddpm_hybrid, or ddpm_vlb with variance: learned)")
        return reason

    def per_example(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                    labels: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """``|| target - target_theta ||^2`` averaged over dimensions; ``(B,)``."""
        x_t, prediction, _ = self.predicted(model, x0, t, noise, labels, index)
        return _simple(model, x0, x_t, t, noise, prediction, self.target)


class VariationalBound(_DDPMObjective):
    """DDPM's full variational bound L (bits/dim), fixed or learned reverse variance.

    Args:
        variance: ``beta_tilde`` (sigma_t^2 = beta~_t), ``beta`` (sigma_t^2 = beta_t) or
            ``learned`` (the network outputs v; Nichol & Dhariwal 2021).
        decoder_bins: data levels of the discretized decoder L_0 (256 for 8-bit images, 17 for
            the 0..16 digits); null for a continuous Gaussian decoder.
    """

    def __init__(
        self,
        variance: Literal["beta_tilde", "beta", "learned"] = "beta_tilde",
        decoder_bins: Annotated[int, Field(ge=2, le=65_536)] | None = 256,
    ) -> None:
        self.variance = variance
        self.decoder_bins = decoder_bins

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        reason = super().check(process, network)
        if reason is None and (self.variance == "learned") != network.learned_variance:
            if network.learned_variance:
                return "variance: learned, since the network has learned_variance"
            return "a network with learned_variance: true for variance: learned"
        return reason

    def per_example(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                    labels: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """``L_T + T L_{i-1}`` per example, in bits per dimension; ``(B,)``."""
        x_t, prediction, v = self.predicted(model, x0, t, noise, labels, index)
        return _vlb_bits(model, x0, x_t, t, prediction, v, self.variance, self.decoder_bins)


class HybridLoss(_DDPMObjective):
    """L_hybrid = L_simple + lambda L_vlb with a learned variance (Nichol & Dhariwal 2021).

    Args:
        vlb_weight: lambda (the paper's 0.001).
        decoder_bins: data levels of the discretized decoder L_0 (see ``ddpm_vlb``).
    """

    def __init__(
        self,
        vlb_weight: Annotated[float, Field(ge=0, le=1e6)] = 0.001,
        decoder_bins: Annotated[int, Field(ge=2, le=65_536)] | None = 256,
    ) -> None:
        self.vlb_weight = vlb_weight
        self.decoder_bins = decoder_bins

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        reason = super().check(process, network)
        if reason is None and not network.learned_variance:
            return "a network with learned_variance: true (ddpm_hybrid learns the variance)"
        return reason

    def per_example(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                    labels: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """``L_simple + lambda L_vlb`` per example, the mean stopped inside L_vlb; ``(B,)``."""
        x_t, prediction, v = self.predicted(model, x0, t, noise, labels, index)
        simple = _simple(model, x0, x_t, t, noise, prediction, "auto")
        vlb = _vlb_bits(model, x0, x_t, t, prediction.detach(), v, "learned",
                        self.decoder_bins)
        return simple + self.vlb_weight * vlb

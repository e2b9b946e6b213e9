"""Weighted denoising: one loss, the weightings and time distributions of the recent recipes.

Every regression objective on ``x_t = alpha x0 + sigma eps`` is, at fixed ``(x_t, t)``, a
weighted error of the denoised estimate (Kingma & Gao 2023, "Understanding Diffusion Objectives
as the ELBO with Simple Data Augmentation", section 2)::

    l(theta; t) = w(t) * mean || x0_theta(x_t, t) - x0 ||^2

because every parameterisation is affine in ``x0`` at fixed ``x_t`` (:meth:`NoiseProcess.convert`):
the error of ``eps`` is ``-alpha / sigma`` times the error of ``x0``, that of DDPM's ``v``
``-(alpha^2 + sigma^2) / sigma`` times it, that of the flow velocity ``u = alpha' x0 + sigma'
eps`` ``(alpha' sigma - sigma' alpha) / sigma`` times it. So the weightings, with
``SNR = alpha^2 / sigma^2`` and the noise level ``s = sigma / alpha``:

* ``eps``: ``w = SNR`` (DDPM's L_simple, Ho et al. 2020, eq. 14);
* ``x0``: ``w = 1``;
* ``v``: ``w = (alpha^2 + sigma^2)^2 / sigma^2`` (``SNR + 1`` on a variance-preserving path;
  Salimans & Ho 2022);
* ``velocity``: ``w = (alpha' sigma - sigma' alpha)^2 / sigma^2``, the flow-matching loss
  ``|| u_theta - (alpha' x0 + sigma' eps) ||^2`` (Lipman et al. 2022, eq. 23; ``1 / t^2`` on
  rectified flow's line);
* ``min_snr``: ``w = min(SNR, gamma)`` (Min-SNR-gamma, Hang et al. 2023, eq. 12: ``min(SNR,
  gamma) / SNR`` on the eps loss, ``min(SNR, gamma) / (SNR + 1)`` on the v loss);
* ``p2``: ``w = SNR / (k + SNR)^gamma`` (perception-prioritised weighting, Choi et al. 2022,
  eq. 8: ``1 / (k + SNR)^gamma`` on the eps loss; ``k`` is ``p2_k``, gamma is ``gamma``);
* ``sigmoid``: ``w = SNR sigmoid(bias - log SNR)`` (Kingma & Gao 2023, section 5:
  ``sigmoid(b - lambda)`` on the eps loss, ``lambda`` the log-SNR);
* ``edm``: ``w = lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2 = SNR + 1 / sigma_data^2``
  (Karras et al. 2022, Table 1; with the EDM preconditioning,
  :class:`diffusers_kit.networks.precond.EDMPrecond`, the network's own error has weight 1).

Training times (``times``):

* ``uniform``: ``t`` uniform in ``[t_min, 1]``;
* ``levels``: the process's discrete steps or levels (:func:`dsm.sample_times`);
* ``logit_normal``: ``t = sigmoid(location + scale z)``, ``z ~ N(0, 1)`` (Esser et al. 2024,
  "Scaling Rectified Flow Transformers", eq. 19; location 0, scale 1 is SD3's choice);
* ``log_normal``: the noise level ``ln s ~ N(location, scale^2)`` (EDM's ``P_mean``, ``P_std``:
  -1.2, 1.2), mapped to the time where ``sigma(t) / alpha(t) = s`` (bisection on the log-SNR),
  clamped to ``[t_min, 1]``.

On a process that reaches pure noise (``alpha(1) = 0``) the times stay below ``1 - 1e-5``:
``x0`` from an ``eps`` network is undefined at ``alpha = 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import Objective, mean_dims
from diffusers_kit.objectives.dsm import sample_times
from diffusers_kit.processes.base import NoiseProcess

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network

Tensor = torch.Tensor
WEIGHTINGS = ("eps", "x0", "v", "velocity", "min_snr", "p2", "sigmoid", "edm")
TIMES = ("uniform", "levels", "logit_normal", "log_normal")
PURE_NOISE_MARGIN = 1e-5

Weighting = Literal["eps", "x0", "v", "velocity", "min_snr", "p2", "sigmoid", "edm"]
Times = Literal["uniform", "levels", "logit_normal", "log_normal"]
Positive = Annotated[float, Field(gt=0, le=1e6)]


def x0_weight(process: NoiseProcess, t: Tensor, weighting: str, *, gamma: float = 5.0,
              sigma_data: float = 0.5, p2_k: float = 1.0, bias: float = 0.0) -> Tensor:
    """``w(t)`` of the module's table, shape ``(B,)``, in float64 where the device has it."""
    tt = t if t.device.type == "mps" else t.double()
    alpha, sigma = process.marginal(tt)
    snr = (alpha / sigma) ** 2
    if weighting == "eps":
        w = snr
    elif weighting == "x0":
        w = torch.ones_like(snr)
    elif weighting == "v":
        w = (alpha**2 + sigma**2) ** 2 / sigma**2
    elif weighting == "velocity":
        d_alpha, d_sigma = process.marginal_rates(tt)
        w = ((d_alpha * sigma - d_sigma * alpha) / sigma) ** 2
    elif weighting == "min_snr":
        w = snr.clamp(max=gamma)
    elif weighting == "p2":
        w = snr / (p2_k + snr) ** gamma
    elif weighting == "sigmoid":
        w = snr * torch.sigmoid(bias - snr.log())
    elif weighting == "edm":
        w = snr + 1.0 / sigma_data**2
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return w.to(t.dtype)


def draw_times(process: NoiseProcess, n: int, times: str, *, location: float = 0.0,
               scale: float = 1.0, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Tensor:
    """``n`` training times from the distribution ``times`` of the module's list."""
    from diffusers_kit.solvers.grids import reaches_pure_noise, time_of_log_snr

    upper = 1.0 - PURE_NOISE_MARGIN if reaches_pure_noise(process) else 1.0
    if times in ("uniform", "levels"):
        t = sample_times(process, n, times, device=device, generator=generator)
        return t.clamp(max=upper)
    z = torch.randn(n, device=device, generator=generator)
    if times == "logit_normal":
        t = torch.sigmoid(location + scale * z)
    elif times == "log_normal":
        log_level = (location + scale * z).double().cpu()  # ln s, s = sigma / alpha
        t = time_of_log_snr(process, -2.0 * log_level, process.t_min, upper).to(device)
    else:
        raise ValueError(f"unknown times {times!r}; expected one of {TIMES}")
    return t.float().clamp(process.t_min, upper)


class Denoising(Objective):
    """``w(t) mean || x0_theta(x_t, t) - x0 ||^2`` with a weighting and a time distribution
    from the module's tables (any process, any parameterisation).

    Args:
        weighting: ``eps`` (SNR), ``x0`` (1), ``v``, ``velocity`` (the flow-matching loss),
            ``min_snr`` (min(SNR, gamma); Hang et al. 2023), ``p2`` (SNR / (p2_k +
            SNR)^gamma; Choi et al. 2022), ``sigmoid`` (SNR sigmoid(bias - log SNR); Kingma &
            Gao 2023) or ``edm`` (SNR + 1 /
            sigma_data^2; Karras et al. 2022).
        times: ``uniform`` in [t_min, 1], ``levels`` (a discrete process's steps),
            ``logit_normal`` (t = sigmoid(location + scale z); Esser et al. 2024) or
            ``log_normal`` (ln(sigma / alpha) = location + scale z; Karras et al. 2022).
        location: the mean of the logit-normal's logit or of the log-normal's log level.
        scale: their standard deviation.
        gamma: the clip of ``min_snr`` (Hang et al. 2023 take 5), the exponent of ``p2``
            (Choi et al. 2022 take 0.5 or 1).
        p2_k: the offset k of ``p2`` (Choi et al. 2022: 1).
        bias: the shift b of ``sigmoid``, in log-SNR.
        sigma_data: the data's standard deviation in ``edm`` (0.5 in Karras et al. 2022).
    """

    ddp_ready = True  # one forward through the model, one ordinary backward

    def __init__(
        self,
        weighting: Weighting = "eps",
        times: Times = "uniform",
        location: Annotated[float, Field(ge=-20, le=20)] = 0.0,
        scale: Annotated[float, Field(gt=0, le=20)] = 1.0,
        gamma: Positive = 5.0,
        sigma_data: Positive = 0.5,
        p2_k: Positive = 1.0,
        bias: Annotated[float, Field(ge=-50, le=50)] = 0.0,
    ) -> None:
        self.weighting, self.times = weighting, times
        self.location, self.scale = float(location), float(scale)
        self.gamma, self.sigma_data = float(gamma), float(sigma_data)
        self.p2_k, self.bias = float(p2_k), float(bias)

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if reason := super().check(process, network):
            return reason
        if network.learned_variance:
            return "a network without learned_variance (this loss does not train the variance)"
        if self.times == "levels" and process.num_steps is None and process.lacks(
                process.NOISE_LADDER):
            return "times: levels needs a process with discrete steps or noise levels"
        return None

    def loss(self, model: ScoreModel, x0: Tensor, generator: torch.Generator | None = None,
             labels: Tensor | None = None) -> Tensor:
        t = draw_times(model.process, x0.shape[0], self.times, location=self.location,
                       scale=self.scale, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.per_example(model, x0, t, noise, labels).mean()

    def per_example(self, model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor,
                    labels: Tensor | None = None) -> Tensor:
        """``w(t) mean || x0_theta - x0 ||^2`` per example at the times ``t``; ``(B,)``."""
        process = model.process
        x_t, _ = process.marginal_sample(x0, t, noise)
        prediction, _ = model.split(model(x_t, t, labels))
        x0_hat = model.convert(prediction, x_t, t, "x0")
        w = x0_weight(process, t, self.weighting, gamma=self.gamma, sigma_data=self.sigma_data,
                      p2_k=self.p2_k, bias=self.bias)
        return w * mean_dims((x0_hat - x0).pow(2))


class FlowMatching(Denoising):
    """Flow matching: ``|| u_theta(x_t, t) - (alpha' x0 + sigma' eps) ||^2`` averaged over
    dimensions (Lipman et al. 2022, eq. 23; Liu et al. 2022), at logit-normal times (Esser et
    al. 2024). On the ``flow`` process's line the target is ``eps - x0``.

    Args:
        times: ``logit_normal`` (SD3's default), ``uniform``, ``levels`` or ``log_normal``.
        location: the logit-normal's mean (Esser et al. 2024: 0; positive values train more on
            noisy times).
        scale: its standard deviation (Esser et al. 2024: 1).
    """

    def __init__(
        self,
        times: Times = "logit_normal",
        location: Annotated[float, Field(ge=-20, le=20)] = 0.0,
        scale: Annotated[float, Field(gt=0, le=20)] = 1.0,
    ) -> None:
        super().__init__("velocity", times, location, scale)


class EDMLoss(Denoising):
    """EDM's loss (Karras et al. 2022, eq. 8 and Table 1): ``lambda(s) || D(x_t) - x0 ||^2``
    with ``lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2`` and ``ln s ~ N(P_mean,
    P_std^2)``, ``s = sigma / alpha`` (any process: ``x_t / alpha = x0 + s eps``).

    Args:
        P_mean: the mean of ln s (Karras et al. 2022: -1.2).
        P_std: its standard deviation (1.2).
        sigma_data: the data's standard deviation (0.5).
    """

    def __init__(
        self,
        P_mean: Annotated[float, Field(ge=-20, le=20)] = -1.2,
        P_std: Annotated[float, Field(gt=0, le=20)] = 1.2,
        sigma_data: Positive = 0.5,
    ) -> None:
        super().__init__("edm", "log_normal", P_mean, P_std, sigma_data=sigma_data)
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if reason := super().check(process, network):
            return reason
        wrapped = getattr(network, "sigma_data", None)
        if wrapped is not None and wrapped != self.sigma_data:
            return (f"sigma_data equal to the network's ({wrapped}; the objective has "
                    f"{self.sigma_data}): the weighting and the preconditioning assume one")
        return None


__all__ = ["TIMES", "WEIGHTINGS", "Denoising", "EDMLoss", "FlowMatching", "draw_times",
           "x0_weight"]

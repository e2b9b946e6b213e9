"""Discrete DDPM (Ho et al. 2020).

T steps ``q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)``.
The marginal is ``q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)`` with
``abar_i = prod_{j <= i} (1 - beta_j)`` (Ho et al. 2020, eq. 4). Step ``i`` sits at ``t = i / T``.

Between grid points ``log alpha(t)`` is interpolated linearly, which makes DDPM a
variance-preserving process with the piecewise-constant rate ``beta(t) = -T log(1 - beta_i)`` on
``((i - 1) / T, i / T]`` (left-continuous: at a step's own time ``i / T`` the rate is that of the
step ``i`` a reverse move from ``i / T`` crosses): the continuous view (SDE drift and
diffusion, probability flow) agrees with the discrete chain exactly at every step, and tends to
the VP SDE when
``beta_i = beta_vp(i / T) / T`` and T grows.

Schedules:

* ``linear``: ``beta_i`` evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020:
  1e-4 to 0.02, T = 1000);
* ``scaled_linear``: ``sqrt(beta_i)`` evenly spaced from ``sqrt(beta_start)`` to
  ``sqrt(beta_end)`` (latent diffusion, Rombach et al. 2022: 0.00085 to 0.012, T = 1000;
  diffusers' ``scaled_linear``);
* ``cosine``: ``abar_i = f(i) / f(0)``, ``f(i) = cos^2((i / T + s) / (1 + s) * pi / 2)`` and
  ``beta_i = min(1 - abar_i / abar_{i-1}, max_beta)`` (Nichol & Dhariwal 2021, eq. 17);
* user-given ``betas``.

All coefficient tables are computed once, in float64, when the process is built.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.hookspecs import OptionError
from diffusers_kit.processes.base import Tensor
from diffusers_kit.processes.vp import VariancePreserving

DEFAULT_STEPS = 1000
MAX_STEPS = 1_000_000

Beta = Annotated[float, Field(gt=0, lt=1)]


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """Ho et al. 2020: ``beta_i`` evenly spaced from ``beta_start`` to ``beta_end``."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    """Rombach et al. 2022 (latent diffusion): ``sqrt(beta_i)`` evenly spaced from
    ``sqrt(beta_start)`` to ``sqrt(beta_end)``."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ``abar_i = f(i) / f(0)``, clipped ``beta_i <= max_beta``."""
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos((i / num_steps + offset) / (1.0 + offset) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


class DDPM(VariancePreserving):
    """Discrete DDPM chain with a linear, scaled-linear, cosine or user-given beta schedule
    (Ho et al. 2020).

    Args:
        num_steps: number of steps T (default 1000; with ``betas``, their count).
        schedule: ``linear`` (Ho et al. 2020), ``scaled_linear`` (Rombach et al. 2022: linear
            in ``sqrt(beta)``) or ``cosine`` (Nichol & Dhariwal 2021).
        beta_start: first beta of the linear and scaled-linear schedules.
        beta_end: last beta of the linear and scaled-linear schedules.
        cosine_offset: the offset s of the cosine schedule.
        max_beta: the cosine schedule clips beta_i to at most this.
        betas: explicit beta_1..beta_T (overrides ``schedule``).
    """

    #: The ODE solvers' ``spacing: auto``: DDIM's quadratic grid in ``t`` (Song, Meng & Ermon
    #: 2021), for the linear and the cosine schedule (the comparison with equal log-SNR steps
    #: is in ``docs/solvers.md``).
    default_spacing = "quadratic"

    def __init__(
        self,
        num_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None,
        schedule: Literal["linear", "scaled_linear", "cosine"] = "linear",
        beta_start: Beta = 1e-4,
        beta_end: Beta = 0.02,
        cosine_offset: Annotated[float, Field(ge=0, le=1)] = 0.008,
        max_beta: Beta = 0.999,
        betas: Annotated[list[Beta], Field(min_length=1)] | None = None,
    ) -> None:
        self.schedule = "custom" if betas is not None else schedule
        if betas is not None:
            if num_steps is not None and num_steps != len(betas):
                raise OptionError("num_steps", f"the number of betas ({len(betas)}), or "
                                  "num_steps left out", num_steps)
            table = torch.tensor([float(b) for b in betas], dtype=torch.float64)
        else:
            steps = DEFAULT_STEPS if num_steps is None else int(num_steps)
            if schedule == "linear":
                table = linear_betas(steps, beta_start, beta_end)
            elif schedule == "scaled_linear":
                table = scaled_linear_betas(steps, beta_start, beta_end)
            elif schedule == "cosine":
                table = cosine_betas(steps, cosine_offset, max_beta)
            else:
                raise ValueError(f"unknown schedule {schedule!r}; expected 'linear', "
                                 "'scaled_linear' or 'cosine'")
        self._settings = {"schedule": self.schedule}
        if self.schedule in ("linear", "scaled_linear"):
            self._settings.update(beta_start=beta_start, beta_end=beta_end)
        elif self.schedule == "cosine":
            self._settings.update(cosine_offset=cosine_offset, max_beta=max_beta)
        self._set_betas(table)

    def _set_betas(self, betas: Tensor) -> None:
        """Build every coefficient table from ``beta_1..beta_T`` (float64, once)."""
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if len(betas) > MAX_STEPS:
            raise ValueError(f"{len(betas)} steps is more than the supported {MAX_STEPS}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie strictly between 0 and 1")
        self.num_steps = len(betas)
        self.t_min = 1.0 / self.num_steps
        self.betas = betas
        self.alphas = 1.0 - betas
        log_alphas = torch.log1p(-betas)
        # half_log_abar[i] = log sqrt(abar_i), i = 0..T (abar_0 = 1)
        self.half_log_abar = 0.5 * torch.cat([torch.zeros(1, dtype=torch.float64),
                                              torch.cumsum(log_alphas, 0)])
        self.alphas_cumprod = torch.exp(2.0 * self.half_log_abar[1:])
        # beta(t) on ((i - 1) / T, i / T]: -2 T d(log sqrt abar) = -T log(1 - beta_i)
        self.rates = -self.num_steps * log_alphas
        self._on_device: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._settings.items() if k != "schedule")
        name = type(self).__name__
        return f"{name}(num_steps={self.num_steps}, schedule={self.schedule!r}{extra})"

    def _tables(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The tables on ``t``'s device, copied once per device (float32 where float64 is
        unsupported, as on Apple's MPS)."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        key = (str(t.device), dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.half_log_abar.to(t.device, dtype),
                                    self.rates.to(t.device, dtype))
        return self._on_device[key]

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log sqrt(abar)`` interpolated linearly between the steps ``i / T``."""
        half_log_abar, _ = self._tables(t)
        position = t.to(half_log_abar.dtype) * self.num_steps
        left = position.floor().clamp(0, self.num_steps - 1)
        index = left.long()
        fraction = position - left
        low = half_log_abar[index]
        value = low + fraction * (half_log_abar[index + 1] - low)
        return value.to(t.dtype)

    def beta(self, t: Tensor) -> Tensor:
        """``-T log(1 - beta_i)`` on the step interval ``((i - 1) / T, i / T]`` holding ``t``.

        Left-continuous, so that the SDE coefficients a sampler reads at a grid time ``i / T``
        belong to step ``i``, the step its reverse move to ``(i - 1) / T`` crosses. Positions
        within ``1e-4`` of a step count as on it (float32 times such as ``0.999`` are not exact).
        """
        _, rates = self._tables(t)
        position = t.to(rates.dtype) * self.num_steps
        index = (position - 1e-4).ceil().long().sub(1).clamp(0, self.num_steps - 1)
        return rates[index].to(t.dtype)

    # -- the discrete chain -------------------------------------------------------------------
    def step_times(self, *, device: torch.device | str | None = None) -> Tensor:
        """The times ``i / T`` of steps ``i = T, T-1, ..., 0`` (decreasing; float64)."""
        steps = torch.arange(self.num_steps, -1, -1, device=device, dtype=torch.float64)
        return steps / self.num_steps

    def step_index(self, t: Tensor) -> Tensor:
        """The step ``i = round(t T)`` of times on the grid."""
        return torch.round(t * self.num_steps).long()

    def step_sample(self, x_prev: Tensor, i: int, noise: Tensor | None = None) -> Tensor:
        """One forward step ``x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) eps`` (Ho, eq. 2).

        The chain as defined, from the ``betas`` table alone; :meth:`transition` gives the same
        step from the cumulative table.
        """
        if not 1 <= i <= self.num_steps:
            raise ValueError(f"step {i} is outside 1..{self.num_steps}")
        if noise is None:
            noise = torch.randn_like(x_prev)
        beta = float(self.betas[i - 1])
        return math.sqrt(1.0 - beta) * x_prev + math.sqrt(beta) * noise

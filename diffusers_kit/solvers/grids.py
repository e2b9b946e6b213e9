"""Time grids shared by the samplers, computed once per (process, number of steps), in float64.

A sampler evaluates the network at ``N`` decreasing times ``t_0 = 1 > ... > t_{N-1} = t_min``
and lands, after its last step, on ``t_N = 0``. A discrete process (DDPM, ``num_steps = T``)
has its times snapped to its steps ``i / T``, so ``N = T`` gives exactly Ho et al.'s chain and
fewer steps a sub-sequence of it (DDIM, Song et al. 2021a).

Spacings:

* ``uniform``: equal steps in ``t``;
* ``quadratic``: ``t`` proportional to ``(i / N)^2`` near the data end (DDIM's CIFAR choice);
* ``power``: the same with exponent ``rho``, ``t_i = t_min + (1 - t_min) (1 - i / (N - 1))^rho``
  (``rho = 2`` is ``quadratic``): a larger ``rho`` moves points towards the data end (the ODE
  solvers' ``rho`` option; the samplers without one, DDIM, ancestral and the SDE samplers, use
  ``rho = 7``);
* ``edm``: the noise level ``varsigma = sigma / alpha`` spaced as in Karras et al. 2022, eq. 5,
  ``varsigma_i = (varsigma_max^(1/rho) + i / (N - 1) (varsigma_min^(1/rho) -
  varsigma_max^(1/rho)))^rho`` with ``rho = 7``;
* ``log_snr``: equal steps in ``lambda = log(alpha / sigma)`` (Lu et al. 2022, DPM-Solver);
* ``shifted``: equal steps in ``u`` from 1 to ``S^-1(t_min)``, evaluated at ``t = S(u) = s u /
  (1 + (s - 1) u)``, SD3's time shift (Esser et al. 2024) with the process's ``shift`` ``s``
  (:func:`~diffusers_kit.processes.flow.shift_time`; processes without one are refused);
  ``s = 1`` is ``uniform``. On a ``diffusers_flow`` process it is diffusers'
  ``FlowMatchEulerDiscreteScheduler.set_timesteps`` grid (``docs/diffusers.md``);
* ``auto``: the process's own :attr:`~diffusers_kit.processes.base.NoiseProcess.default_spacing`
  (the ODE solvers' default; ``log_snr`` unless a process says otherwise; docs/solvers.md).

Times for the ``edm`` / ``log_snr`` spacings come from inverting the (monotone) log-SNR by
bisection. Grids and every table built on them are cached per process (:func:`cached`, weakly
keyed: a table dies with its process), so a second ``sample()`` with the same settings does no
schedule work at all.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from diffusers_kit.hookspecs import OptionError
from diffusers_kit.processes.flow import shift_time, unshift_time

if TYPE_CHECKING:
    from diffusers_kit.processes.base import NoiseProcess

Spacing = Literal["auto", "uniform", "quadratic", "power", "edm", "log_snr", "shifted"]
SPACINGS = ("auto", "uniform", "quadratic", "power", "edm", "log_snr", "shifted")


def resolve_spacing(process: NoiseProcess, spacing: str) -> str:
    """``spacing``, with ``auto`` replaced by the process's ``default_spacing`` (the one place
    ``auto`` is decided)."""
    if spacing != "auto":
        return spacing
    chosen = getattr(process, "default_spacing", "log_snr")
    if chosen not in SPACINGS or chosen == "auto":
        raise ValueError(f"{type(process).__name__}.default_spacing is {chosen!r}; expected "
                         f"one of {SPACINGS[1:]}")
    return chosen

Tensor = torch.Tensor


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def cached(process: NoiseProcess, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``(process, key)``; later calls return the same object. Callers put
    everything the value depends on in ``key`` (grid settings, device, dtype). Processes are
    immutable once built, so nothing goes stale."""
    table = _CACHE.setdefault(process, {})
    if key not in table:
        table[key] = build()
    return table[key]


def _f64(values: Tensor | float) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def reaches_pure_noise(process: NoiseProcess) -> bool:
    """Whether ``alpha(1) = 0`` (``x_1 = sigma(1) eps``: rectified flow's path): no step may
    divide by ``alpha`` there, and the log-SNR is ``-inf``."""
    return float(process.alpha(torch.ones(1, dtype=torch.float64))[0]) == 0.0


def log_snr(process: NoiseProcess, t: Tensor) -> Tensor:
    """``lambda(t) = log(alpha^2 / sigma^2)`` in float64."""
    return process.log_snr(_f64(t))


def time_of_log_snr(process: NoiseProcess, target: Tensor, t_low: float, t_high: float) -> Tensor:
    """The times in ``[t_low, t_high]`` where ``lambda(t) = target`` (lambda decreases in t)."""
    target = _f64(target)
    low = torch.full_like(target, t_low)
    high = torch.full_like(target, t_high)
    for _ in range(64):  # 2^-64 of the interval: below float64 resolution
        middle = 0.5 * (low + high)
        above = log_snr(process, middle) > target  # still too little noise: go later
        low = torch.where(above, middle, low)
        high = torch.where(above, high, middle)
    return 0.5 * (low + high)


def sampling_times(
    process: NoiseProcess, steps: int | None, spacing: Spacing = "uniform", rho: float = 7.0
) -> Tensor:
    """``N + 1`` decreasing times: ``N`` evaluation times from 1 to ``t_min``, then 0 (cached;
    the caller gets a copy).

    ``steps=None`` means the process's own number of steps (discrete) or 1000 (continuous).
    A discrete process may return fewer than ``steps`` times (snapped steps that coincide).
    ``spacing="auto"`` is the process's ``default_spacing`` (:func:`resolve_spacing`).
    """
    chosen = cast(Spacing, resolve_spacing(process, spacing))
    key = ("times", steps, chosen, float(rho))
    return cached(process, key, lambda: _sampling_times(process, steps, chosen, rho)).clone()


def smallest_time(process: NoiseProcess) -> float:
    """The last evaluation time of every grid: the process's ``t_min``, and at least its first
    step ``1 / T`` for a discrete process."""
    discrete = process.num_steps
    t_min = float(process.t_min)
    return t_min if discrete is None else max(t_min, 1.0 / discrete)


def step_of(times: Tensor, steps: int) -> Tensor:
    """The step ``i`` of a ``steps``-step discrete process that each time falls on
    (``round(t T)``, at least 1): the one rule that snaps grids to such a process (its times are
    then ``i / T``)."""
    return torch.round(times * steps).clamp(1, steps)


def check_times(times: Sequence[float]) -> None:
    """What any process asks of a solver's own times: they start at 1 and decrease
    (:class:`~diffusers_kit.hookspecs.OptionError` on ``times`` otherwise)."""
    if not times or times[0] != 1.0 or any(b >= a for a, b in itertools.pairwise(times)):
        raise OptionError("times", "times that start at 1 and decrease", list(times))


def given_times(process: NoiseProcess, times: Sequence[float]) -> Tensor:
    """A solver's own evaluation times (its ``times`` option: a tuned grid, say) as
    :func:`sampling_times` returns a grid: ``times`` then 0, in float64; a discrete process's
    snapped to its steps ``i / T``. Raises ``ValueError`` saying what is wrong: they must pass
    :func:`check_times`, end at or after :func:`smallest_time`, and fall on distinct steps."""
    check_times(times)
    given = _f64(list(times))
    t_min = smallest_time(process)
    if float(given[-1]) < t_min * (1 - 1e-9):
        raise ValueError(f"times must end at or after this process's smallest time {t_min:.6g}; "
                         f"got {float(given[-1]):.6g}")
    discrete = process.num_steps
    if discrete is not None:
        snapped = step_of(given, discrete)
        clash = torch.nonzero(snapped[1:] == snapped[:-1])
        if clash.numel():
            i = int(clash[0, 0])
            raise ValueError(f"times {float(given[i]):.6g} and {float(given[i + 1]):.6g} fall on "
                             f"the same step {int(snapped[i])} of this {discrete}-step process: "
                             "give times on distinct steps i / T")
        given = snapped / discrete
    return torch.cat([given, torch.zeros(1, dtype=torch.float64)])


def _sampling_times(process: NoiseProcess, steps: int | None, spacing: Spacing, rho: float
                    ) -> Tensor:
    discrete = process.num_steps
    if steps is None:
        steps = discrete if discrete is not None else 1000
    t_min = smallest_time(process)
    if discrete is not None:
        steps = min(steps, discrete)
    fraction = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if steps == 1:
        times = torch.ones(1, dtype=torch.float64)
    elif spacing == "uniform":
        times = 1.0 - fraction * (1.0 - t_min)
    elif spacing == "shifted":
        shift = getattr(process, "shift", None)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or shift <= 0:
            raise ValueError(f"spacing 'shifted' applies the process's time shift, and "
                             f"{type(process).__name__} has none (the flow and diffusers_flow "
                             "processes have one): use another spacing")
        end = float(unshift_time(_f64(t_min), float(shift)))
        times = shift_time(1.0 - fraction * (1.0 - end), float(shift))
        times[0], times[-1] = 1.0, t_min
    elif spacing in ("quadratic", "power"):
        times = t_min + (1.0 - t_min) * (1.0 - fraction) ** (2.0 if spacing == "quadratic" else rho)
    elif spacing in ("edm", "log_snr"):
        ends = _f64([1.0, t_min])
        lam_max_noise, lam_min_noise = log_snr(process, ends)  # lambda(1) < lambda(t_min)
        if torch.isinf(lam_max_noise):
            raise ValueError(f"spacing {spacing!r} is spaced in the log-SNR, which is -inf at "
                             "t = 1 on a process with alpha(1) = 0: use uniform or quadratic")
        if spacing == "log_snr":
            lam = lam_max_noise + fraction * (lam_min_noise - lam_max_noise)
        else:
            top, bottom = torch.exp(-0.5 * lam_max_noise), torch.exp(-0.5 * lam_min_noise)
            level = (top ** (1 / rho) + fraction * (bottom ** (1 / rho) - top ** (1 / rho))) ** rho
            lam = -2.0 * torch.log(level)
        times = time_of_log_snr(process, lam, t_min, 1.0)
        times[0], times[-1] = 1.0, t_min
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if discrete is not None:
        index = torch.unique(step_of(times, discrete)).flip(0)  # decreasing, no repeats
        times = index / discrete
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True, eq=False)
class TimeGrid:
    """The points of a sampling grid: ``N`` evaluation times ``t_0 = 1 > ... > t_{N-1} =
    t_min``, then the landing point ``t_N = 0`` where ``sigma = 0`` (the last step lands on the
    denoised estimate). Per point, as Python floats: ``t``, ``alpha``, ``sigma``, the noise level
    ``level = sigma / alpha`` (``inf`` where ``alpha = 0``, 0 at the landing) and ``lam =
    log(alpha / sigma)`` (``-inf`` where ``alpha = 0``, ``inf`` at the landing); ``times`` is
    ``t`` as a float64 tensor. A step table (:func:`~diffusers_kit.solvers.tables.step_table`)
    adds per-move rows: ``tensors`` (float64, ``(N,)``) and the same as floats in ``rows``."""

    times: Tensor
    t: list[float]
    alpha: list[float]
    sigma: list[float]
    level: list[float]
    lam: list[float]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, list[float]] = field(default_factory=dict)
    _vectors: dict = field(default_factory=dict, repr=False)

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def marginal(self, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` at point ``i`` as 0-dim tensors of ``like``'s device and dtype
        (for :meth:`ScoreModel.predict`; cached, see :func:`as_scalars`)."""
        return self.scalar("alpha", like, self.alpha)[i], self.scalar("sigma", like, self.sigma)[i]

    def ratio(self, like: Tensor) -> list[Tensor]:
        """Each step's ``sigma_{i+1} / sigma_i`` as 0-dim tensors (cached)."""
        return self.scalar("ratio", like, [b / a if a else 0.0 for a, b in
                                           zip(self.sigma, self.sigma[1:], strict=False)])

    def scalar(self, name: str, like: Tensor, values: list[float] | None = None
               ) -> list[Tensor]:
        """Row ``name`` (or ``values``, cached under ``name``) as 0-dim tensors of ``like``'s
        device and dtype (:func:`as_scalars`)."""
        return as_scalars(self._vectors, name, self.rows[name] if values is None else values,
                          like)

    def vectors(self, batch: int, like: Tensor) -> tuple[Tensor, ...]:
        """Item ``i``: ``t_i`` as a ``(batch,)`` tensor of ``like``'s device and dtype
        (cached)."""
        key = (batch, str(like.device), like.dtype)
        if key not in self._vectors:
            self._vectors[key] = (self.times[:-1, None].to(device=like.device, dtype=like.dtype)
                                  .expand(-1, batch).contiguous().unbind(0))
        return self._vectors[key]


def as_scalars(cache: dict, name: str, values: list[float], like: Tensor) -> list[Tensor]:
    """``values`` as 0-dim tensors of ``like``'s device and dtype, kept in ``cache`` (a grid's)
    under ``name``: a loop scales by these rather than by floats (``x * 0.5`` wraps the float in
    a new tensor at every call, about twice the time of ``x * c`` on a small batch; the product
    is the same)."""
    key = (name, str(like.device), like.dtype)
    if key not in cache:
        cache[key] = [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]
    return cache[key]


@dataclass(frozen=True)
class OnGrid:
    """A solver's grid: a :class:`TimeGrid` (``table``) and the solver's own per-step data
    (its subclasses' fields)."""

    table: TimeGrid

    @property
    def t(self) -> list[float]:
        return self.table.t


def time_grid(process: NoiseProcess, steps: int | None, spacing: Spacing = "uniform",
              rho: float = 7.0, times: Sequence[float] | None = None) -> TimeGrid:
    """The cached :class:`TimeGrid` of ``sampling_times(process, steps, spacing, rho)``, or of
    the evaluation times ``times`` when given (:func:`given_times`; ``steps``, ``spacing``
    and ``rho`` are then unused)."""

    def build() -> TimeGrid:
        points = (sampling_times(process, steps, spacing, rho) if times is None
                  else given_times(process, times))
        alpha, sigma = process.marginal(points)
        sigma = sigma.clone()
        sigma[-1] = 0.0
        with torch.no_grad():
            level = torch.where(sigma > 0, sigma / alpha, torch.zeros_like(sigma))
        lam = -torch.log(level)
        return TimeGrid(points, points.tolist(), alpha.tolist(), sigma.tolist(),
                        level.tolist(), lam.tolist())

    key = (("time_grid", steps, resolve_spacing(process, spacing), float(rho)) if times is None
           else ("given_grid", tuple(float(t) for t in times)))
    return cached(process, key, build)

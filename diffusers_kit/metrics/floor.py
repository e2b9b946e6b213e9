"""Noise floors and bootstrap error bars: the one place every metric takes them from.

A distribution metric ``D(samples, reference)`` compares ``n`` generated examples with ``n``
held-out real ones. A single figure means little until it stands beside two others:

- the **noise floor** ``D(real, reference)``: ``real`` is ``n`` training examples, disjoint from
  the held-out ``reference``, so the floor is what a perfect generator would score at this ``n``
  (finite-sample noise alone). Every metric of a run draws the same ``real`` subset (seeded by
  the run's seed), so floors of different metrics describe the same pair of sets.
- the **interval**: ``D ± z sqrt(V)`` (``z`` the normal quantile of ``level``), clipped to the
  metric's range, where ``V`` estimates the variance of ``D`` over fresh draws of both sets of
  the same sizes. The naive bootstrap (resample both sets with replacement) overstates it
  1.7–3x: these statistics are smooth two-sample functionals ``D = L + Q`` (a linear part of
  variance ``V_L``, zero when the two distributions are equal, and a quadratic part of variance
  ``V_Q``); resampling from the two empirical distributions, which differ by sampling noise
  even when the populations do not, adds that difference's gradient, ``2 V_Q`` on top of
  ``V_L + V_Q`` (and duplicated points distort nearest-neighbour and U-statistics further).
  So ``V`` combines two resampling schemes without duplicates:

  - **half-sampling** (McCarthy 1969): half of each set, drawn without replacement. The mean
    of half of N points varies around the full mean exactly as the full mean varies around
    the population's (finite-population correction ``1 - 1/2``), so its variance ``V_half``
    estimates ``V_L + 3 V_Q``;
  - **permutation**: the two sets pooled and split at random into two sets of the original
    sizes. Both halves then come from one distribution, so its variance ``V_perm`` is the
    sampling variance when the distributions are equal, ``V_Q`` for FD and KID, whose linear
    part vanishes there;

  and ``V = max(V_half - 2 V_perm, V_perm)``: the first term is ``V_L + V_Q`` for a smooth
  statistic, the second the exact answer when the distributions are equal (it is the larger
  one there for statistics such as PRDC's, whose linear part does not vanish). Both are lower
  estimates where the other is valid, so the maximum keeps the one that applies. Checked
  against the true spread of 300 independent draws of Gaussian features (d = 8 and 64,
  identical and shifted distributions): docs/evaluation.md, tests/test_metrics_intervals.py.

Per-item metrics (a classifier's accuracy, the PSNR of each restoration) report a mean, and the
percentile bootstrap interval of the mean (a linear statistic, for which the bootstrap is
right).

Keys written (flat and numeric, for ``metrics.json``): ``X``, ``X_floor``, ``X_low``, ``X_high``,
``X_floor_low``, ``X_floor_high`` and ``X_n`` for every statistic ``X``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits

# a statistic of two sets; returns one or more named numbers (PRDC returns four)
Statistic = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]
# the same statistic evaluated on index vectors into the two sets (a faster or duplicate-aware
# route for the bootstrap; ``None``: ``statistic(a[ia], b[ib])``)
IndexStatistic = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]

Resamples = Annotated[int, Field(ge=0, le=100_000)]
Level = Annotated[float, Field(gt=0, lt=1)]

SUFFIXES = ("_floor", "_low", "_high", "_floor_low", "_floor_high", "_n", "_std", "_ratio")


@dataclass(frozen=True)
class ErrorBars:
    """How intervals are computed: ``resamples`` bootstrap draws (0: no interval) at ``level``."""

    resamples: int = 200
    level: float = 0.95


@dataclass
class RealSets:
    """The sets a distribution metric compares: ``samples`` and ``real`` against ``reference``,
    all of size ``n``."""

    samples: torch.Tensor
    reference: torch.Tensor
    real: torch.Tensor
    n: int
    real_index: torch.Tensor  # rows of data.train in ``real``


def real_sets(samples: torch.Tensor, data: DataSplits, generator: torch.Generator) -> RealSets:
    """``n = min(samples, held-out, train)``: ``n`` samples, the first ``n`` held-out examples
    (the reference) and ``n`` training examples drawn without replacement (for the floor).
    When there are more samples than ``n``, the ``n`` are drawn without replacement too: samples
    are often ordered (class-conditional ones in blocks of their label), and their first ``n``
    would be a biased subset. The draws use a fresh generator seeded like ``generator``: the
    same subsets for every metric of a run, whatever their order."""
    n = min(len(samples), len(data.heldout), len(data.train))
    if n < 2:
        raise ValueError(f"a distribution metric needs at least 2 samples and 2 held-out "
                         f"examples; there are {len(samples)} and {len(data.heldout)}")
    draw = torch.Generator().manual_seed(generator.initial_seed())
    index = torch.randperm(len(data.train), generator=draw)[:n]
    chosen = samples if len(samples) == n else samples[
        torch.randperm(len(samples), generator=draw)[:n].sort().values.to(samples.device)]
    return RealSets(chosen.detach().float().cpu(), data.heldout[:n].float().cpu(),
                    data.train[index].float().cpu(), n, index)


def bootstrap_generator(generator: torch.Generator, name: str) -> torch.Generator:
    """A generator for ``name``'s resampling: seeded by the run's seed and the metric's name, so
    a metric's interval does not depend on which metrics ran before it."""
    return torch.Generator().manual_seed(generator.initial_seed() + zlib.crc32(name.encode()))


def _quantiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    probabilities = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values.double(), probabilities).tolist()
    return low, high


def _clip(value: float, bounds: tuple[float, float] | None) -> float:
    if bounds is None:
        return value
    return min(max(value, bounds[0]), bounds[1])


def sampling_interval(
    estimate: Mapping[str, float],
    replicates: Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]],
    sizes: tuple[int, int],
    generator: torch.Generator,
    bars: ErrorBars,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Interval ``estimate ± z sqrt(V)`` of each statistic, ``V = max(V_half - 2 V_perm,
    V_perm)`` (module docstring), from ``bars.resamples`` draws of each scheme.

    ``replicates(ia, ib)`` evaluates the statistics on two disjoint index vectors into the
    pooled sets, the first set's rows ``0 .. sizes[0] - 1`` followed by the second's. NaN bounds
    when ``bars.resamples`` is 0 (or below 2).
    """
    if bars.resamples < 2:
        return {key: (math.nan, math.nan) for key in estimate}
    na, nb = sizes
    half: dict[str, list[float]] = {key: [] for key in estimate}
    permuted: dict[str, list[float]] = {key: [] for key in estimate}
    for _ in range(bars.resamples):
        ia = torch.randperm(na, generator=generator)[: na // 2]
        ib = na + torch.randperm(nb, generator=generator)[: nb // 2]
        split = torch.randperm(na + nb, generator=generator)
        for draws, (ja, jb) in ((half, (ia, ib)), (permuted, (split[:na], split[na:]))):
            values = replicates(ja, jb)
            for key in draws:
                draws[key].append(float(values[key]))
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + bars.level) / 2)))
    out = {}
    for key, value in estimate.items():
        v_half = torch.tensor(half[key], dtype=torch.float64).var()
        v_perm = torch.tensor(permuted[key], dtype=torch.float64).var()
        width = z * float(torch.maximum(v_half - 2 * v_perm, v_perm).sqrt())
        limits = (bounds or {}).get(key)
        out[key] = (_clip(value - width, limits), _clip(value + width, limits))
    return out


def compare_with_floor(
    name: str,
    statistic: Statistic,
    sets: RealSets,
    generator: torch.Generator,
    bars: ErrorBars,
    *,
    samples: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    replicates: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, float]]
    | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """``statistic(samples, reference)`` beside ``statistic(real, reference)``, each with its
    interval (:func:`sampling_interval`); the flat keys of the module docstring for every
    statistic.

    ``samples`` / ``reference`` / ``real`` replace the raw sets of ``sets`` (e.g. by their
    features); ``replicates(a, ia, ib)`` evaluates the statistic of ``(pool[ia], pool[ib])``,
    ``pool`` the rows of ``a`` followed by those of ``reference``, by another route (faster:
    from kernel or distance matrices of the pool computed once). ``name`` seeds the draws.
    """
    samples = sets.samples if samples is None else samples
    reference = sets.reference if reference is None else reference
    real = sets.real if real is None else real
    draw = bootstrap_generator(generator, name)
    out: dict[str, float] = {}
    for role, a in (("", samples), ("_floor", real)):
        estimate = {key: float(v) for key, v in statistic(a, reference).items()}
        if replicates is None:
            pool = torch.cat([a, reference.to(a.dtype)])

            def resampled(ia: torch.Tensor, ib: torch.Tensor, pool: torch.Tensor = pool
                          ) -> Mapping[str, float]:
                return statistic(pool[ia], pool[ib])
        else:
            def resampled(ia: torch.Tensor, ib: torch.Tensor, a: torch.Tensor = a
                          ) -> Mapping[str, float]:
                return replicates(a, ia, ib)
        intervals = sampling_interval(estimate, resampled, (len(a), len(reference)), draw,
                                      bars, bounds)
        for key, value in estimate.items():
            out[f"{key}{role}"] = value
            out[f"{key}{role}_low"] = intervals[key][0]
            out[f"{key}{role}_high"] = intervals[key][1]
    for key in list(out):
        if not key.endswith(("_floor", "_low", "_high")):
            out[f"{key}_n"] = float(sets.n)
    return _ordered(out)


def mean_with_interval(name: str, values: torch.Tensor, generator: torch.Generator,
                       bars: ErrorBars) -> dict[str, float]:
    """Mean of per-item ``values`` (``X``), their standard deviation (``X_std``), the percentile
    bootstrap interval of the mean (``X_low``, ``X_high``) and the count (``X_n``)."""
    values = values.detach().double().cpu().flatten()
    n = len(values)
    if n == 0:
        raise ValueError(f"{name}: no items to average")
    mean = float(values.mean())
    low = high = math.nan
    if bars.resamples > 0:
        draw = bootstrap_generator(generator, name)
        index = torch.randint(n, (bars.resamples, n), generator=draw)
        low, high = _quantiles(values[index].mean(dim=1), bars.level)
    std = float(values.std(unbiased=False))
    return {name: mean, f"{name}_std": std, f"{name}_low": low, f"{name}_high": high,
            f"{name}_n": float(n)}


def _ordered(out: dict[str, float]) -> dict[str, float]:
    """Keys grouped per statistic: ``X, X_floor, X_low, X_high, X_floor_low, ..., X_n``."""
    bases = [k for k in out if not k.endswith(SUFFIXES)]
    order = {}
    for base in bases:
        for suffix in ("", "_floor", "_low", "_high", "_floor_low", "_floor_high", "_n"):
            if f"{base}{suffix}" in out:
                order[f"{base}{suffix}"] = out[f"{base}{suffix}"]
    order.update({k: v for k, v in out.items() if k not in order})
    return order


# -- reading them back: the run summary, the log line, dkit evaluate ---------------------------
def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


def summarize(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One ``(name, text)`` row per statistic: ``value (floor F) [low, high] n=N``, its
    companions (``_floor``, ``_low``, ... ) folded into the row; other keys as they are."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if any(key.endswith(s) and key[: -len(s)] in metrics for s in SUFFIXES):
            continue  # a companion, folded into its statistic's row
        companions = {s: metrics[f"{key}{s}"] for s in SUFFIXES if f"{key}{s}" in metrics}
        text = _number(value)
        if "_std" in companions:
            text += f" ± {_number(companions['_std'])}"
        if "_low" in companions and "_high" in companions:
            text += f" [{_number(companions['_low'])}, {_number(companions['_high'])}]"
        if "_floor" in companions:
            text += f"  floor {_number(companions['_floor'])}"
            if "_floor_low" in companions and "_floor_high" in companions:
                text += (f" [{_number(companions['_floor_low'])}, "
                         f"{_number(companions['_floor_high'])}]")
        if "_ratio" in companions:
            text += f"  ratio {_number(companions['_ratio'])}"
        if "_n" in companions:
            text += f"  n={_number(companions['_n'])}"
        rows.append((key, text))
    return _per_class_folded(rows)


def _per_class_folded(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``name_0 .. name_K`` (a per-class table such as class_accuracy's) as one row
    ``name per class: 0: v0  1: v1 ...`` right after ``name``'s own row."""
    names = {key for key, _ in rows}
    folded: dict[str, list[str]] = {}
    kept: list[tuple[str, str]] = []
    for key, text in rows:
        stem, _, suffix = key.rpartition("_")
        if stem in names and suffix.isdigit():
            folded.setdefault(stem, []).append(f"{suffix}: {text}")
        else:
            kept.append((key, text))
    out: list[tuple[str, str]] = []
    for key, text in kept:
        out.append((key, text))
        if key in folded:
            out.append((f"{key} per class", "  ".join(folded[key])))
    return out

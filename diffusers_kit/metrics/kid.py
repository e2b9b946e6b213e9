"""Kernel inception distance in a trained classifier's feature space (Bińkowski et al. 2018).

KID is the squared maximum mean discrepancy between the two feature distributions under the
polynomial kernel ``k(x, y) = (x . y / d + 1)^3`` (d: feature width), estimated without bias:

    MMD^2 = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j)

averaged over ``subsets`` random subsets of ``subset_size`` examples of each set, whose spread
is reported as ``kid_std`` (Bińkowski et al. 2018, sec. 4). Being unbiased, KID of two samples of
one distribution is 0 on average (it may be negative). The estimator is torchmetrics'
``KernelInceptionDistance``, fed this project's features.

The interval is that of the full-set estimate (one subset of all n examples;
:mod:`diffusers_kit.metrics.floor`): the subsets' spread describes subsets of ``subset_size``,
not the figure over all n.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.fd import Precomputed
from diffusers_kit.metrics.features import FeatureMetric
from diffusers_kit.metrics.floor import (
    Level,
    Resamples,
    bootstrap_generator,
    compare_with_floor,
)
from diffusers_kit.references import TrainedModel

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int, subset_size: int,
                    generator: torch.Generator) -> tuple[float, float]:
    """KID (mean over subsets) and its standard deviation over subsets, for feature sets ``a``
    and ``b``; the subsets are drawn with ``generator`` (torchmetrics draws from torch's global
    generator, which is saved and restored around the call)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 examples per set; there are {len(a)} and "
                         f"{len(b)}")
    with warnings.catch_warnings():  # torchmetrics warns that it keeps the features: we know
        warnings.simplefilter("ignore", UserWarning)
        from diffusers_kit.metrics.fidelity import torchmetrics_image

        estimator = torchmetrics_image("kid").KernelInceptionDistance
        metric = estimator(feature=Precomputed(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def full_set_kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The unbiased MMD^2 estimate over all of ``a`` and ``b`` (equal sizes)."""
    from diffusers_kit.metrics.fidelity import torchmetrics_image

    poly_mmd = torchmetrics_image("kid").poly_mmd
    return float(poly_mmd(a.double(), b.double(), degree=3, gamma=None, coef=1.0))


class Kernels:
    """The kernel matrix of the pooled feature sets ``[a; b]``, computed once: the full-set
    KID of any two sets of its rows, ``(pool[ia], pool[ib])``, is then read off by indexing
    it."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        from diffusers_kit.metrics.fidelity import torchmetrics_image

        pool = torch.cat([a.double(), b.double()])
        self.pool = torchmetrics_image("kid").poly_kernel(pool, pool)

    def kid(self, ia: torch.Tensor, ib: torch.Tensor) -> float:
        from diffusers_kit.metrics.fidelity import torchmetrics_image

        mmd = torchmetrics_image("kid").maximum_mean_discrepancy
        k = self.pool
        return float(mmd(k[ia][:, ia], k[ia][:, ib], k[ib][:, ib]))


class KernelDistance(FeatureMetric):
    """KID of samples to held-out data in a classifier's feature space, beside its floor
    (``kid``, ``kid_std`` over subsets, ``kid_floor``, ``kid_low`` / ``kid_high``, ...).

    Args:
        features: the trained classifier whose penultimate layer is the feature space.
        subsets: random subsets the estimate is averaged over.
        subset_size: examples per subset (null: half of the compared sets' size).
        resamples: bootstrap resamples for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "kid"

    def __init__(
        self,
        features: TrainedModel,
        subsets: Annotated[int, Field(ge=1, le=10_000)] = 100,
        subset_size: Annotated[int, Field(ge=2, le=1_000_000)] | None = None,
        resamples: Resamples = 200,
        level: Level = 0.95,
    ) -> None:
        super().__init__(features, resamples, level)
        self.subsets = subsets
        self.subset_size = subset_size

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        sets, fake, reference, real = self.embedded_sets(samples, data, generator)
        size = self.subset_size or max(2, sets.n // 2)
        draw = bootstrap_generator(generator, "kid subsets")
        spreads: dict[int, float] = {}

        def statistic(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            mean, std = kernel_distance(a, b, self.subsets, size, draw)
            spreads[id(a)] = std
            return {"kid": mean}

        kernels: dict[int, Kernels] = {}

        def replicates(a: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> dict[str, float]:
            # full_set_kid(pool[ia], pool[ib]), pool = [a; reference], from its kernel matrix
            if id(a) not in kernels:
                kernels[id(a)] = Kernels(a, reference)
            return {"kid": kernels[id(a)].kid(ia, ib)}

        out = compare_with_floor(self.name, statistic, sets, generator, self.bars,
                                 samples=fake, reference=reference, real=real,
                                 replicates=replicates)
        out["kid_std"] = spreads[id(fake)]
        out["kid_floor_std"] = spreads[id(real)]
        return out


__all__ = ["KernelDistance", "Kernels", "full_set_kid", "kernel_distance"]

"""Toy 2-D data sets (modality ``points``; the report draws a scatter plot of samples over data).

All are drawn from a seeded generator, centred near the origin and scaled to about [-2, 2]^2
so that one set of sampler settings suits them all.

* ``two_moons``: two interleaved half circles (as in scikit-learn's ``make_moons``);
* ``swiss_roll``: the 2-D spiral ``t (cos t, sin t)``, ``t in [1.5 pi, 4.5 pi]``;
* ``checkerboard``: uniform on the dark squares of a 4x4 board (FFJORD's toy set);
* ``gaussian_mixture``: equal-weight Gaussians evenly spaced on a circle (the "8 Gaussians").
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.data.base import Dataset, DataSplits

Count = Annotated[int, Field(ge=1, le=10_000_000)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
# a length in data units: the sets span a few units, so 1,000 is far beyond any use and
# keeps float32 data finite
Length = Annotated[float, Field(ge=0, le=1000)]
PositiveLength = Annotated[float, Field(gt=0, le=1000)]


class Toy2D(Dataset):
    """Base of the toy sets: ``draw(n, generator) -> (n, 2)``; seeded train / held-out split.

    Args:
        n_train: training points.
        n_heldout: held-out points (for metrics and the scatter plot).
        noise: standard deviation of Gaussian noise added to every point.
        seed: seed of the draw.
    """

    modality = "points"

    def __init__(self, n_train: int, n_heldout: int, noise: float, seed: int) -> None:
        self.n_train, self.n_heldout, self.noise, self.seed = n_train, n_heldout, noise, seed

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """Class labels of the last draw, for sets that have classes."""
        return None

    def load(self) -> DataSplits:
        generator = torch.Generator().manual_seed(self.seed)
        n = self.n_train + self.n_heldout
        points = self.draw(n, generator)
        if self.noise > 0:
            points = points + self.noise * torch.randn(n, 2, generator=generator)
        points = points.float().contiguous()
        labels = self.labels()
        return DataSplits(train=points[: self.n_train], heldout=points[self.n_train:],
                          train_labels=None if labels is None else labels[: self.n_train],
                          heldout_labels=None if labels is None else labels[self.n_train:])


class TwoMoons(Toy2D):
    """Two interleaved half circles of radius 1, centred and scaled by 1.5."""

    def __init__(self, n_train: Count = 8000, n_heldout: Count = 2000,
                 noise: Length = 0.05, seed: Seed = 0) -> None:
        super().__init__(n_train, n_heldout, noise, seed)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        angle = math.pi * torch.rand(n, generator=generator)
        lower = torch.rand(n, generator=generator) < 0.5
        x = torch.where(lower, 1.0 - torch.cos(angle), torch.cos(angle))
        y = torch.where(lower, 0.5 - torch.sin(angle), torch.sin(angle))
        return 1.5 * (torch.stack([x, y], 1) - torch.tensor([0.5, 0.25]))


class SwissRoll(Toy2D):
    """The 2-D swiss roll ``t (cos t, sin t) / 7``, ``t`` uniform in [1.5 pi, 4.5 pi]."""

    def __init__(self, n_train: Count = 8000, n_heldout: Count = 2000,
                 noise: Length = 0.1, seed: Seed = 0) -> None:
        super().__init__(n_train, n_heldout, noise, seed)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=generator))
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.0


class Checkerboard(Toy2D):
    """Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2."""

    def __init__(self, n_train: Count = 8000, n_heldout: Count = 2000,
                 noise: Length = 0.0, seed: Seed = 0) -> None:
        super().__init__(n_train, n_heldout, noise, seed)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x = 4.0 * torch.rand(n, generator=generator) - 2.0
        row = torch.randint(0, 2, (n,), generator=generator).float()
        y = torch.rand(n, generator=generator) - 2.0 * row + torch.floor(x).remainder(2.0)
        return torch.stack([x, y], 1)


class GaussianMixture(Toy2D):
    """Equal-weight Gaussians evenly spaced on a circle, labelled by their component.

    Args:
        components: number of Gaussians.
        radius: radius of the circle of means.
        std: standard deviation of each Gaussian.
    """

    def __init__(self, components: Annotated[int, Field(ge=1, le=1000)] = 8,
                 radius: PositiveLength = 2.0,
                 std: PositiveLength = 0.15,
                 n_train: Count = 8000, n_heldout: Count = 2000,
                 seed: Seed = 0) -> None:
        super().__init__(n_train, n_heldout, 0.0, seed)
        self.components, self.radius, self.std = components, radius, std
        self.num_classes = components
        self._labels: torch.Tensor | None = None

    def means(self) -> torch.Tensor:
        angle = 2 * math.pi * torch.arange(self.components) / self.components
        return self.radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.randint(0, self.components, (n,), generator=generator)
        self._labels = which
        return self.means()[which] + self.std * torch.randn(n, 2, generator=generator)

    def labels(self) -> torch.Tensor | None:
        return self._labels

"""Time / noise-level and class embeddings shared by the networks."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style features of a scalar per sample (Vaswani et al. 2017; Ho et al. 2020).

    ``t`` in [0, 1] is scaled by 1000 so that the frequencies cover the DDPM step range.
    Returns ``(B, dim)``: ``[cos(w_k * 1000 t), sin(w_k * 1000 t)]`` with
    ``w_k = max_period^(-k / (dim/2))``.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


class FourierFeatures(torch.nn.Module):
    """Random Fourier features ``[sin(2 pi w t), cos(2 pi w t)]``, ``w ~ N(0, scale^2)`` fixed
    (Tancik et al. 2020; the Gaussian Fourier projection of Song et al. 2021's NCSN++).

    The frequencies are a buffer (saved in checkpoints, not trained).
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.freqs[None, :]
        embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if self.dim % 2:
            embedding = torch.nn.functional.pad(embedding, (0, 1))
        return embedding


class TimeEmbedding(torch.nn.Module):
    """Sinusoidal (or random Fourier) features of ``t`` followed by a two-layer MLP."""

    def __init__(self, dim: int, kind: str = "sinusoidal", fourier_scale: float = 16.0) -> None:
        super().__init__()
        self.dim = dim
        self.kind = kind
        self.fourier = FourierFeatures(dim, fourier_scale) if kind == "fourier" else None
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 4 * dim), torch.nn.SiLU(), torch.nn.Linear(4 * dim, 4 * dim)
        )

    @property
    def out_dim(self) -> int:
        return 4 * self.dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.fourier is not None:
            features = self.fourier(t)
        else:
            features = sinusoidal_embedding(t, self.dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ClassEmbedding(torch.nn.Module):
    """Learned class embeddings with one extra *null* class (index ``num_classes``).

    ``y=None`` (unconditional) maps every sample to the null class; during training, labels are
    replaced by the null class with probability ``drop_prob`` so that one network learns both the
    conditional and the unconditional score (classifier-free guidance, Ho & Salimans 2022).
    The null class's embedding starts at zero, so a fresh network ignores the condition.
    """

    def __init__(self, num_classes: int, dim: int, drop_prob: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.drop_prob = drop_prob
        self.table = torch.nn.Embedding(num_classes + 1, dim)
        with torch.no_grad():
            self.table.weight[num_classes].zero_()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.null_class, device=device, dtype=torch.long)
        else:
            y = y.long()
            if self.training and self.drop_prob > 0:
                drop = torch.rand(y.shape, device=y.device) < self.drop_prob
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return self.table(y)

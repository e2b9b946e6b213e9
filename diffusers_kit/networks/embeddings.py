"""Time / noise-level embeddings shared by the networks."""

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


class TimeEmbedding(torch.nn.Module):
    """Sinusoidal features of ``t`` followed by a two-layer MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 4 * dim), torch.nn.SiLU(), torch.nn.Linear(4 * dim, 4 * dim)
        )

    @property
    def out_dim(self) -> int:
        return 4 * self.dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))

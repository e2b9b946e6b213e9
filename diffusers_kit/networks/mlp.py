"""A residual MLP for 2-D and tabular data, conditioned on a time / noise-level embedding.

Each block is ``h <- h + W2 SiLU(W1 LayerNorm(h) + E(emb))``: the embedding of ``t`` (sinusoidal
or random Fourier features, then a small MLP) is added inside every block, so the network can
represent a different vector field at every noise level.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.networks.base import Network, check_data_shape
from diffusers_kit.networks.embeddings import ClassEmbedding, TimeEmbedding


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.dropout = nn.Dropout(dropout)
        self.outer = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        inner = nn.functional.silu(self.inner(self.norm(h)) + self.emb(emb))
        return h + self.outer(self.dropout(inner))


class MLP(Network):
    """Residual MLP with a sinusoidal or Fourier time embedding, for vector data ``(d,)``.

    Args:
        width: hidden width.
        blocks: residual blocks.
        embedding: ``sinusoidal`` (Ho et al. 2020) or ``fourier`` (random Gaussian Fourier
            features, Tancik et al. 2020) features of ``t``.
        embedding_dim: number of features before the embedding MLP.
        fourier_scale: standard deviation of the Fourier frequencies.
        dropout: dropout inside the blocks.
        prediction: what the output means (``eps``, ``score``, ``x0``, ``v``, ``mu`` or
            ``velocity``, the flow-matching target).
        learned_variance: also output ``v`` for a learned reverse variance (doubles the output).
        num_classes: class-conditional with this many classes (plus a null class).
        class_dropout: probability of training on the null class (classifier-free guidance).
    """

    def __init__(
        self,
        width: Annotated[int, Field(ge=2, le=8192)] = 128,
        blocks: Annotated[int, Field(ge=1, le=64)] = 3,
        embedding: Literal["sinusoidal", "fourier"] = "sinusoidal",
        embedding_dim: Annotated[int, Field(ge=2, le=4096)] = 32,
        fourier_scale: Annotated[float, Field(gt=0, le=1000)] = 16.0,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        prediction: Literal["eps", "score", "x0", "v", "mu", "velocity"] = "eps",
        learned_variance: bool = False,
        num_classes: Annotated[int, Field(ge=1, le=100_000)] | None = None,
        class_dropout: Annotated[float, Field(ge=0, le=1)] = 0.0,
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__(prediction, learned_variance)
        check_data_shape("mlp", data_shape, 1, "vector data of shape (dimensions,) — for images "
                         "use unet or ncsn")
        self.data_shape = tuple(data_shape)
        (d,) = self.data_shape
        self.time = TimeEmbedding(embedding_dim, embedding, fourier_scale)
        e = self.time.out_dim
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.classes = (ClassEmbedding(num_classes, e, class_dropout)
                        if num_classes is not None else None)
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, e, dropout) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * d if learned_variance else d)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        emb = self.time(t)
        if self.classes is not None:
            emb = emb + self.classes(y, x.shape[0], x.device)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.norm_out(h)))

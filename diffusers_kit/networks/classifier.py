"""A noise-aware classifier ``p(y | x_t, t)`` for classifier guidance (Dhariwal & Nichol 2021).

Trained on noised inputs ``x_t`` at every noise level, its gradient ``grad_x log p(y | x_t, t)``
is the term guidance adds to the unconditional score (Song et al. 2021, eq. 14). For images it is
the down-sampling half of the U-Net followed by attention-free global average pooling; for vector
data a residual MLP. The output is ``(B, num_classes)`` logits. Train it with
``objective: {kind: classification}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.hookspecs import OptionError
from diffusers_kit.networks.base import Network
from diffusers_kit.networks.embeddings import TimeEmbedding
from diffusers_kit.networks.mlp import ResidualBlock
from diffusers_kit.networks.unet import ResBlock


class NoiseAwareClassifier(Network):
    """Noise-aware classifier: logits of ``p(y | x_t, t)`` (Dhariwal & Nichol 2021).

    Args:
        num_classes: number of classes.
        channels: width of the first level (images) or hidden width (vectors).
        channel_mult: width multiplier per level (images; each level halves the resolution).
        blocks: residual blocks per level (images) or in total (vectors).
        dropout: dropout inside the blocks.
        norm_groups: GroupNorm groups (images; must divide every level's width).
    """

    prediction = "logits"

    def __init__(
        self,
        num_classes: Annotated[int, Field(ge=2, le=100_000)] = 10,
        channels: Annotated[int, Field(ge=1, le=1024)] = 32,
        channel_mult: Annotated[list[Annotated[int, Field(ge=1, le=16)]],
                                Field(min_length=1, max_length=8)] = [1, 2],  # noqa: B006
        blocks: Annotated[int, Field(ge=1, le=8)] = 1,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        norm_groups: Annotated[int, Field(ge=1, le=1024)] = 8,
        pooling: Literal["mean"] = "mean",
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        nn.Module.__init__(self)
        self.num_labels = num_classes  # outputs; num_classes (a conditioning input) stays None
        self.data_shape = tuple(int(s) for s in data_shape)
        self.time = TimeEmbedding(channels)
        e = self.time.out_dim
        if len(self.data_shape) == 3:
            c, h, w = self.data_shape
            levels = len(channel_mult)
            if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
                raise ValueError(f"classifier with {levels} levels needs height and width "
                                 f"divisible by {2 ** (levels - 1)}; the images are {h}x{w}")
            widths = [channels * m for m in channel_mult]
            if any(width % norm_groups for width in widths):
                raise OptionError("norm_groups", f"a divisor of every level's width {widths}",
                                  norm_groups)
            self.conv_in = nn.Conv2d(c, channels, 3, padding=1)
            self.levels = nn.ModuleList()
            self.downsample = nn.ModuleList()
            current = channels
            for i, width in enumerate(widths):
                level = nn.ModuleList()
                for _ in range(blocks):
                    level.append(ResBlock(current, width, e, dropout, norm_groups))
                    current = width
                self.levels.append(level)
                if i < levels - 1:
                    self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
            self.norm_out = nn.GroupNorm(norm_groups, current)
        elif len(self.data_shape) == 1:
            self.conv_in = nn.Linear(self.data_shape[0], channels)
            self.levels = nn.ModuleList([nn.ModuleList(
                ResidualBlock(channels, e, dropout) for _ in range(blocks))])
            self.downsample = nn.ModuleList()
            current = channels
            self.norm_out = nn.LayerNorm(current)
        else:
            raise ValueError("classifier needs images (channels, height, width) or vectors "
                             f"(dimensions,); this data set's examples have shape {data_shape}")
        self.head = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, t))

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, ``(B, width)``: what the logits are a linear map of.

        Distribution metrics (:mod:`diffusers_kit.metrics.fd` and its siblings) compare samples
        in this space, as FID compares them in Inception's pool layer (Heusel et al. 2017).
        """
        emb = self.time(t)
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h, emb)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = nn.functional.silu(self.norm_out(h))
        if h.dim() == 4:
            h = h.mean(dim=(2, 3))
        return h

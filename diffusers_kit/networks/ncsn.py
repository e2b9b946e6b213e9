"""A noise-conditional score network for small images (NCSN; Song & Ermon 2019).

The network sees ``x_t`` and the time ``t`` (equivalently the noise level ``sigma(t)``; on the VE
ladder ``log sigma`` is linear in ``t``) and predicts ``eps``; the score follows as
``s(x, t) = -eps / sigma(t)``, the output scaling NCSNv2 recommends (Song & Ermon 2020).
Layout: a two-level U-Net of residual blocks with GroupNorm, with the embedded noise level added
to every block.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.networks.base import Network
from diffusers_kit.networks.embeddings import TimeEmbedding


def _groups(channels: int) -> int:
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


class ConditionalResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected embedding, twice, with a skip connection."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return h + self.skip(x)


class NCSN(Network):
    """Noise-conditional score network for small images (NCSN-style conditional U-Net).

    Args:
        channels: width of the first level; the second level has ``2 * channels``.
        blocks: residual blocks per level.
        dropout: dropout inside residual blocks.
        prediction: what the output means (``eps`` gives NCSNv2's ``score = out / sigma`` scaling).
    """

    def __init__(
        self,
        channels: Annotated[int, Field(ge=4, le=1024)] = 32,
        blocks: Annotated[int, Field(ge=1, le=8)] = 2,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        prediction: Literal["eps", "score", "x0", "v"] = "eps",
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__(prediction)
        if len(data_shape) != 3:
            raise ValueError(
                f"ncsn needs image data of shape (channels, height, width), got {data_shape}"
            )
        c, h, w = data_shape
        if h % 2 or w % 2:
            raise ValueError(f"ncsn needs even image height and width, got {h}x{w}")
        self.data_shape = tuple(data_shape)
        self.time = TimeEmbedding(channels)
        e = self.time.out_dim
        c1, c2 = channels, 2 * channels
        self.conv_in = nn.Conv2d(c, c1, 3, padding=1)
        self.down1 = nn.ModuleList(ConditionalResBlock(c1, c1, e, dropout) for _ in range(blocks))
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = nn.ModuleList(ConditionalResBlock(c2, c2, e, dropout) for _ in range(blocks))
        self.mid = ConditionalResBlock(c2, c2, e, dropout)
        self.up2 = nn.ModuleList(ConditionalResBlock(c2, c2, e, dropout) for _ in range(blocks))
        self.upsample = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.up1 = nn.ModuleList(
            ConditionalResBlock(2 * c1 if i == 0 else c1, c1, e, dropout) for i in range(blocks)
        )
        self.norm_out = nn.GroupNorm(_groups(c1), c1)
        self.conv_out = nn.Conv2d(c1, c, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(t)
        h1 = self.conv_in(x)
        for block in self.down1:
            h1 = block(h1, emb)
        h2 = self.downsample(h1)
        for block in self.down2:
            h2 = block(h2, emb)
        h2 = self.mid(h2, emb)
        for block in self.up2:
            h2 = block(h2, emb)
        h = torch.cat([self.upsample(h2), h1], dim=1)
        for block in self.up1:
            h = block(h, emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

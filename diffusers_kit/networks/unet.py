"""The DDPM U-Net (Ho et al. 2020, appendix B; after PixelCNN++ / Wide ResNet).

Levels of residual blocks at resolutions ``H, H/2, ...`` (widths ``channels * channel_mult``),
GroupNorm everywhere, the time embedding added inside every residual block, self-attention at the
chosen resolutions and in the middle, dropout inside the blocks, and skip connections from every
block on the way down to the matching block on the way up. The last convolution of every block
and of the output starts at zero, so a fresh network is the identity plus zero.

Conditioning: ``num_classes`` adds a learned class embedding to the time embedding (the DDPM /
ADM way); a ``conditioner`` instead turns the condition into a context sequence that the
attention blocks attend to by cross-attention (latent diffusion, Rombach et al. 2022): every
attention block becomes a :class:`~diffusers_kit.networks.attention.SpatialTransformer`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.hookspecs import OptionError
from diffusers_kit.networks.attention import SelfAttention, SpatialTransformer, zero
from diffusers_kit.networks.base import Network, check_data_shape
from diffusers_kit.networks.embeddings import ClassEmbedding, TimeEmbedding


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(nn.functional.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return h + self.skip(x)


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attention: list[nn.Module | None]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(a if a is not None else nn.Identity() for a in attention)


class UNet(Network):
    """DDPM U-Net: residual blocks, GroupNorm, self-attention at chosen resolutions, dropout.

    Args:
        channels: width of the first level.
        channel_mult: width multiplier of each level; level ``i`` runs at resolution
            ``H / 2^i`` (the image side must be divisible by ``2^(levels - 1)``).
        res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (in pixels, e.g. ``[4]`` for 8x8 inputs) with
            self-attention after each residual block.
        heads: attention heads (must divide every level's width).
        dropout: dropout inside the residual blocks (Ho et al.: 0.1 on CIFAR-10).
        norm_groups: GroupNorm groups (must divide every level's width; Ho et al. use 32).
        prediction: what the output means (``eps``, ``score``, ``x0``, ``v``, ``mu`` or
            ``velocity``, the flow-matching target).
        learned_variance: also output ``v`` for a learned reverse variance (doubles the output
            channels; Nichol & Dhariwal 2021).
        num_classes: class-conditional with this many classes (plus a null class): a class
            embedding added to the time embedding. With a ``conditioner`` it may be left out
            (the conditioner's ``num_classes`` is used) or must equal the conditioner's.
        class_dropout: probability of training on the null class (classifier-free guidance);
            with a conditioner, its label dropout.
        conditioner: a nested conditioner (e.g. ``{kind: class_tokens, num_classes: 10}``):
            the label becomes a context sequence and the attention blocks (at
            ``attention_resolutions`` and in the middle) become spatial transformers that
            cross-attend to it, instead of a class embedding added to the time embedding.
        transformer_depth: transformer layers in each spatial transformer (with a conditioner).
    """

    def __init__(
        self,
        channels: Annotated[int, Field(ge=1, le=1024)] = 32,
        channel_mult: Annotated[list[Annotated[int, Field(ge=1, le=16)]],
                                Field(min_length=1, max_length=8)] = [1, 2],  # noqa: B006
        res_blocks: Annotated[int, Field(ge=1, le=8)] = 2,
        attention_resolutions: Annotated[list[Annotated[int, Field(ge=1, le=4096)]],
                                       Field(max_length=8)] = [4],  # noqa: B006
        heads: Annotated[int, Field(ge=1, le=1024)] = 1,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        norm_groups: Annotated[int, Field(ge=1, le=1024)] = 8,
        prediction: Literal["eps", "score", "x0", "v", "mu", "velocity"] = "eps",
        learned_variance: bool = False,
        num_classes: Annotated[int, Field(ge=1, le=100_000)] | None = None,
        class_dropout: Annotated[float, Field(ge=0, le=1)] = 0.0,
        conditioner: Conditioner | None = None,
        transformer_depth: Annotated[int, Field(ge=1, le=8)] = 1,
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__(prediction, learned_variance)
        check_data_shape("unet", data_shape, 3, "image data of shape (channels, height, width)")
        c, h, w = (int(s) for s in data_shape)
        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        if h % factor or w % factor:
            raise ValueError(f"unet with {levels} levels (channel_mult {list(channel_mult)}) "
                             f"halves the image {levels - 1} times, so height and width must be "
                             f"divisible by {factor}; the data's images are {h}x{w}")
        widths = [channels * m for m in channel_mult]
        for width in widths:
            if width % norm_groups:
                raise OptionError("norm_groups", f"a divisor of every level's width "
                                  f"(channels x channel_mult = {widths})", norm_groups)
            if width % heads:
                raise OptionError("heads", f"a divisor of every level's width ({widths})", heads)
        resolutions = [min(h, w) // 2**i for i in range(levels)]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise OptionError("attention_resolutions", f"resolutions of this network's levels "
                              f"(they run at {resolutions} pixels)", list(attention_resolutions))
        self.data_shape = (c, h, w)
        self.time = TimeEmbedding(channels)
        e = self.time.out_dim
        if conditioner is not None:
            if num_classes is not None and num_classes != conditioner.num_classes:
                raise OptionError("num_classes", f"the conditioner's num_classes "
                                  f"({conditioner.num_classes}), or num_classes left out (the "
                                  "conditioner's is used)", num_classes)
            num_classes = conditioner.num_classes
            conditioner.drop_prob = class_dropout
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        # with a conditioner the label enters through cross-attention only
        self.classes = (ClassEmbedding(num_classes, e, class_dropout)
                        if num_classes is not None and conditioner is None else None)
        self.conditioner = conditioner

        def block(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, e, dropout, norm_groups)

        def attention(width: int, res: int) -> nn.Module | None:
            if res not in attention_resolutions:
                return None
            if conditioner is not None:
                return SpatialTransformer(width, heads, conditioner.dim, transformer_depth,
                                          norm_groups)
            return SelfAttention(width, heads, norm_groups)

        self.conv_in = nn.Conv2d(c, channels, 3, padding=1)
        skips = [channels]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        current = channels
        for i, width in enumerate(widths):
            blocks, attn = [], []
            for _ in range(res_blocks):
                blocks.append(block(current, width))
                attn.append(attention(width, resolutions[i]))
                current = width
                skips.append(current)
            self.down.append(Level(blocks, attn))
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skips.append(current)
        self.mid1 = block(current, current)
        self.mid_attn = (SpatialTransformer(current, heads, conditioner.dim, transformer_depth,
                                            norm_groups)
                         if conditioner is not None else SelfAttention(current, heads, norm_groups))
        self.mid2 = block(current, current)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            blocks, attn = [], []
            for _ in range(res_blocks + 1):
                blocks.append(block(current + skips.pop(), widths[i]))
                attn.append(attention(widths[i], resolutions[i]))
                current = widths[i]
            self.up.append(Level(blocks, attn))
            if i > 0:
                self.upsample.append(nn.Conv2d(current, current, 3, padding=1))
        self.norm_out = nn.GroupNorm(norm_groups, current)
        self.conv_out = zero(nn.Conv2d(current, 2 * c if learned_variance else c, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        emb = self.time(t)
        if self.classes is not None:
            emb = emb + self.classes(y, x.shape[0], x.device)
        context = (self.conditioner(y, x.shape[0], x.device)
                   if self.conditioner is not None else None)

        def attend(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return attn(h, context) if isinstance(attn, SpatialTransformer) else attn(h)

        h = self.conv_in(x)
        stack = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attention, strict=True):
                h = attend(attn, block(h, emb))
                stack.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                stack.append(h)
        h = self.mid2(attend(self.mid_attn, self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attention, strict=True):
                h = attend(attn, block(torch.cat([h, stack.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[i](h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

"""The convolutional encoder and decoder every first stage shares (Rombach et al. 2022, app. G;
after the VQGAN of Esser et al. 2021 and the DDPM U-Net's residual blocks, without time).

Encoder: ``conv_in``, then ``L = log2(f) + 1`` levels of ``blocks`` residual blocks at
resolutions ``H, H/2, ..., H/f`` with a stride-2 convolution between levels, a middle block, and
``GroupNorm -> SiLU -> conv`` to the requested channels. The decoder mirrors it: ``conv_in``
from the latent, a middle block, the levels in reverse with nearest-neighbour upsampling + a
3x3 convolution (to the next level's width) between them, and ``GroupNorm -> SiLU -> conv`` back
to the image's channels. Level ``i`` has width ``channels * channel_mult[i]``. A KL autoencoder
asks the encoder for ``2c`` channels (mean and log-variance), a VQ autoencoder for ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.networks.attention import zero
from diffusers_kit.networks.base import check_data_shape

# the architecture options every first stage takes (bounds written once)
Downsample = Literal[2, 4]
LatentChannels = Annotated[int, Field(ge=1, le=64)]
Width = Annotated[int, Field(ge=1, le=1024)]
ChannelMult = Annotated[list[Annotated[int, Field(ge=1, le=16)]], Field(min_length=1, max_length=3)]
Blocks = Annotated[int, Field(ge=1, le=8)]
NormGroups = Annotated[int, Field(ge=1, le=1024)]
ReconstructionLoss = Literal["l1", "l2"]


class ResidualBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` (a 1x1 convolution on the skip path when the
    width changes); the last convolution starts at zero, so a fresh block is its skip path."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (no checkerboard of transposed convs) to the
    next level's width (at the higher resolution, the narrower width is the cheaper one)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_widths(name: str, downsample: int, channels: int, channel_mult: Sequence[int],
                 norm_groups: int) -> list[int]:
    """Width of each of the ``log2(f) + 1`` levels: ``channels * channel_mult[i]``, a shorter
    ``channel_mult`` repeating its last entry; a clear ValueError for settings that cannot be
    built (a longer list, a width that ``norm_groups`` does not divide)."""
    levels = int(math.log2(downsample)) + 1
    if 2 ** (levels - 1) != downsample:
        raise ValueError(f"{name}: downsample must be a power of 2, got {downsample}")
    mult = list(channel_mult)
    if not mult or len(mult) > levels:
        raise ValueError(f"{name}: channel_mult needs 1 to {levels} entries (one per level; "
                         f"downsample {downsample} has {levels} levels), got {mult}")
    widths = [channels * m for m in mult + [mult[-1]] * (levels - len(mult))]
    for width in widths:
        if width % norm_groups:
            raise ValueError(f"{name}: norm_groups ({norm_groups}) must divide every level's "
                             f"width (channels x channel_mult = {widths})")
    return widths


def image_shape(name: str, data_shape: tuple[int, ...], downsample: int) -> tuple[int, int, int]:
    """``data_shape`` as ``(C, H, W)`` with ``H`` and ``W`` divisible by ``downsample`` (a clear
    ValueError otherwise)."""
    check_data_shape(name, data_shape, 3, "image data of shape (channels, height, width)")
    c, h, w = (int(s) for s in data_shape)
    if h % downsample or w % downsample:
        raise ValueError(f"{name} with downsample {downsample} maps an HxW image to a "
                         f"H/{downsample} x W/{downsample} latent, so height and width must be "
                         f"divisible by {downsample}; the data's images are {h}x{w}")
    return c, h, w


class Encoder(nn.Module):
    """Image ``(B, C, H, W)`` -> features ``(B, out_channels, H/f, W/f)`` (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], blocks: int,
                 groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        current = widths[0]
        for i, width in enumerate(widths):
            for _ in range(blocks):
                layers.append(ResidualBlock(current, width, groups))
                current = width
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        layers.append(ResidualBlock(current, current, groups))  # the middle block
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, current)
        self.conv_out = nn.Conv2d(current, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv_in(x))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, in_channels, H/f, W/f)`` -> image ``(B, out_channels, H, W)``: the encoder
    mirrored (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], blocks: int,
                 groups: int) -> None:
        super().__init__()
        current = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, current, 3, padding=1)
        layers: list[nn.Module] = [ResidualBlock(current, current, groups)]  # the middle block
        for i in reversed(range(len(widths))):
            for _ in range(blocks):
                layers.append(ResidualBlock(current, widths[i], groups))
                current = widths[i]
            if i > 0:
                layers.append(Upsample(current, widths[i - 1]))
                current = widths[i - 1]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(groups, current)
        self.conv_out = nn.Conv2d(current, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv_in(z))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class ConvAutoencoder(Autoencoder):
    """The set-up the built-in families share: the images' shape checked against ``f``, the
    level widths, ``latent_shape = (c, H/f, W/f)``, an :class:`Encoder` to
    ``encoder_channels`` (``2c`` for a KL posterior, ``c`` for a VQ code) and a
    :class:`Decoder` from ``c`` channels. A family's own constructor (its signature is its
    schema) calls this one with its parameters.

    Args:
        downsample: spatial factor f between image and latent (2 or 4; H and W must be
            divisible by it).
        latent_channels: channels c of the latent.
        channels: width of the first (full-resolution) level.
        channel_mult: width multiplier of each of the log2(f) + 1 levels, from the image's
            resolution down to the latent's; a shorter list repeats its last entry.
        blocks: residual blocks per level (in the encoder and in the decoder).
        norm_groups: GroupNorm groups (must divide every level's width).
    """

    def __init__(self, name: str, data_shape: tuple[int, ...], downsample: int,
                 latent_channels: int, encoder_channels: int, channels: int,
                 channel_mult: Sequence[int], blocks: int, norm_groups: int, loss: str) -> None:
        super().__init__()
        c_img, h, w = image_shape(name, data_shape, downsample)
        widths = level_widths(name, downsample, channels, channel_mult, norm_groups)
        self.data_shape = (c_img, h, w)
        self.latent_shape = (latent_channels, h // downsample, w // downsample)
        self.downsample = downsample
        self.reconstruction_loss = loss
        self.encoder = Encoder(c_img, encoder_channels, widths, blocks, norm_groups)
        self.decoder = Decoder(latent_channels, c_img, widths, blocks, norm_groups)


def reconstruction_error(x: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over all elements of ``|x - target|`` (``l1``) or ``(x - target)^2`` (``l2``)."""
    difference = x - target
    return difference.abs().mean() if kind == "l1" else difference.square().mean()


__all__ = ["ConvAutoencoder", "Decoder", "Encoder", "ResidualBlock", "Upsample", "image_shape",
           "level_widths", "reconstruction_error"]

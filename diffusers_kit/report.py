"""Pictures a person can look at: image grids and scatter plots (Pillow only)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(
    images: torch.Tensor, columns: int | None = None, *, cell: int = 48, pad: int = 2
) -> Image.Image:
    """Tile ``(N, C, H, W)`` images with values in [0, 1] into one picture.

    Small images are enlarged with nearest-neighbour scaling to about ``cell`` pixels, so 8x8
    digits stay crisp. C = 1 gives grayscale, C = 3 RGB.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, cell // max(h, w))
    hs, ws = h * scale, w * scale
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (columns * (ws + pad) + pad, rows * (hs + pad) + pad),
                       color=128 if mode == "L" else (128, 128, 128))
    pixels = (images * 255).round().to(torch.uint8).numpy()
    for index in range(n):
        row, col = divmod(index, columns)
        array = pixels[index, 0] if c == 1 else np.transpose(pixels[index, :3], (1, 2, 0))
        tile = Image.fromarray(array, mode=mode).resize((ws, hs), Image.NEAREST)
        canvas.paste(tile, (pad + col * (ws + pad), pad + row * (hs + pad)))
    return canvas


def scatter_plot(
    points: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    size: int = 640,
    margin: int = 24,
) -> Image.Image:
    """Scatter the first two coordinates of ``points`` (blue) over ``reference`` (grey)."""
    sets = [points.detach().float().cpu().flatten(1)[:, :2]]
    if reference is not None:
        sets.insert(0, reference.detach().float().cpu().flatten(1)[:, :2])
    both = torch.cat(sets)
    low = torch.quantile(both, 0.001, dim=0)
    high = torch.quantile(both, 0.999, dim=0)
    span = (high - low).max().clamp_min(1e-6) * 1.1
    centre = (low + high) / 2
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([margin, margin, size - margin, size - margin], outline=(200, 200, 200))
    colours = [(170, 170, 170), (31, 119, 180)] if reference is not None else [(31, 119, 180)]
    for data, colour in zip(sets, colours, strict=True):
        xy = ((data - centre) / span + 0.5) * (size - 2 * margin) + margin
        for x, y in xy.tolist():
            draw.ellipse([x - 1.5, size - y - 1.5, x + 1.5, size - y + 1.5], fill=colour)
    return canvas


def columns_per_class(labels: torch.Tensor | None) -> int | None:
    """Grid columns that put each block of equal labels on its own row (labels drawn in equal
    contiguous blocks, as ``sample.labels: all`` lays them out); None otherwise."""
    if labels is None or len(labels) < 2:
        return None
    labels = labels.flatten()
    blocks = int((labels[1:] != labels[:-1]).sum()) + 1
    if blocks < 2 or len(labels) % blocks:
        return None
    size = len(labels) // blocks
    if not torch.equal(labels, labels[::size].repeat_interleave(size)):
        return None
    return size

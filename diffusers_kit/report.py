"""Pictures a person can look at: image grids, scatter plots and metric-vs-setting plots
(Pillow only)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


# -- metric vs setting ---------------------------------------------------------------------------
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Colour = tuple[int, int, int]

BLUE, ORANGE, GREEN, RED, PURPLE, BROWN = ((31, 119, 180), (255, 127, 14), (44, 160, 44),
                                           (214, 39, 40), (148, 103, 189), (140, 86, 75))
PALETTE = (BLUE, ORANGE, GREEN, RED, PURPLE, BROWN)
GRID_GREY = (235, 235, 235)
MARKERS = ("dot", "square", "diamond", "triangle")


def font(size: int) -> Font:
    """Pillow's default font at ``size`` points (the small bitmap font on an old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow, or no FreeType: the small bitmap font
        return ImageFont.load_default()


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], words: str, face: Font,
              anchor: str = "lt", fill: Colour = (0, 0, 0), halo: bool = False) -> None:
    """``words`` placed by ``anchor`` (l/m/r horizontally, t/m/b vertically) at ``xy``;
    ``halo``: a white outline, so the words stay legible over lines."""
    left, top, right, bottom = draw.textbbox((0, 0), words, font=face)
    w, h = right - left, bottom - top
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]] - left
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]] - top
    if halo:
        draw.text((x, y), words, fill=fill, font=face, stroke_width=2,
                  stroke_fill=(255, 255, 255))
    else:
        draw.text((x, y), words, fill=fill, font=face)


def text_width(draw: ImageDraw.ImageDraw, words: str, face: Font) -> float:
    left, _, right, _ = draw.textbbox((0, 0), words, font=face)
    return right - left


def vertical_text(image: Image.Image, centre: tuple[float, float], words: str, face: Font,
                  fill: Colour) -> None:
    """``words`` turned a quarter left (reading upwards), centred on ``centre``."""
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), words, font=face)
    strip = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((2 - left, 2 - top), words, fill=fill, font=face)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (int(centre[0] - strip.width / 2), int(centre[1] - strip.height / 2)),
                strip)


def dashed(draw: ImageDraw.ImageDraw, y: float, x0: float, x1: float, fill: Colour,
           dash: int = 6) -> None:
    """A horizontal dashed line at height ``y`` from ``x0`` to ``x1``."""
    x = x0
    while x < x1:
        draw.line([x, y, min(x + dash, x1), y], fill=fill, width=1)
        x += 2 * dash


def nice_ticks(top: float, bottom: float = 0.0) -> list[float]:
    """About five round ticks (steps of 1, 2, 2.5 or 5 times a power of ten) from at most
    ``bottom`` to at least ``top``."""
    low, high = min(bottom, top), max(bottom, top)
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    span = high - low
    if span <= 1e-12 * max(1.0, abs(high)):  # one value: a range around it
        span = abs(high) or 1.0
        low, high = (low - span / 2, high + span / 2) if low < 0 else (0.0, high + span)
    raw = span / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Ticks written with the decimals their step needs (0.0 0.2 ... 1.0; 0 5 10)."""
    if len(ticks) < 2:
        return [f"{t:g}" for t in ticks]
    step = abs(ticks[1] - ticks[0])
    if step >= 1e5 or step < 1e-4:
        return [f"{t:.3g}" for t in ticks]
    mantissa = f"{step:.6f}".rstrip("0")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return [f"{t:.{decimals}f}" for t in ticks]


def _number(value: float | None) -> float:
    """``None`` / NaN / infinity as NaN (a missing point), anything else as a float."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


@dataclass
class Series:
    """One metric of a :func:`metric_plot`: a value per setting (``None`` or NaN: no point),
    optional interval bounds per setting, an optional floor (one value drawn across the plot,
    or one per setting) and the axis it is read on."""

    name: str
    values: Sequence[float | None]
    lows: Sequence[float | None] | None = None
    highs: Sequence[float | None] | None = None
    floor: float | Sequence[float | None] | None = None
    axis: str = "left"  # "left" or "right"
    title: str | None = None  # the axis title (default: the name)
    digits: str = ".3g"  # format of the value written beside each point
    bounds: tuple[float, float] | None = None  # the metric's own range, e.g. (0, 1)
    colour: Colour | None = None  # default: the next colour of PALETTE

    @property
    def floor_per_setting(self) -> bool:
        return self.floor is not None and not isinstance(self.floor, numbers.Real)

    def floors(self, k: int) -> list[float]:
        if self.floor is None:
            return [math.nan] * k
        if self.floor_per_setting:
            return [_number(v) for v in self.floor]  # type: ignore[union-attr]
        return [_number(self.floor)] * k  # type: ignore[arg-type]


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, mark: str, colour: Colour,
            r: float = 4) -> None:
    if mark == "dot":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif mark == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif mark == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)],
                     fill=colour)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=colour)


def _axis_ticks(series: list[Series], k: int) -> list[float]:
    """Round ticks covering every value, interval bound and floor of ``series`` (from 0 when
    they are all positive), up to 5 % headroom, within the metrics' own bounds."""
    numbers = [v for s in series
               for seq in (s.values, s.lows or [], s.highs or [])
               for v in map(_number, seq) if not math.isnan(v)]
    numbers += [v for s in series for v in s.floors(k) if not math.isnan(v)]
    if not numbers:
        return nice_ticks(1.0)
    top, bottom = max(numbers), min(numbers)
    top = top * 1.05 if top > 0 else top * 0.95
    bottom = bottom * 1.05 if bottom < 0 else 0.0
    limits = [s.bounds for s in series if s.bounds is not None]
    if limits:
        ceiling = max(hi for _, hi in limits)
        floor = min(lo for lo, _ in limits)
        if max(numbers) <= ceiling:
            top = min(top, ceiling)
        if min(numbers) >= floor:
            bottom = max(bottom, floor)
    return nice_ticks(top, bottom)


def metric_plot(settings: Sequence[str], series: Sequence[Series], title: str, xlabel: str,
                *, size: tuple[int, int] | None = None,
                ticks: Mapping[str, Sequence[float]] | None = None,
                floor_label: str = "floors (real data)") -> Image.Image:
    """Metrics against settings (evenly spaced, labelled ``settings``): the ``left`` series on
    the left axis, the ``right`` ones on the right, each a line through its points with the
    value written beside every point, its interval as a bar and its floor as a dashed line.

    ``ticks`` fixes an axis's ticks (``{"left": [0, 0.5, 1]}``), e.g. to share one axis between
    panels; otherwise round ticks cover the data. Missing values (``None``, NaN) leave a gap.
    """
    k = len(settings)
    if k == 0:
        raise ValueError("metric_plot needs at least one setting")
    for s in series:
        if s.axis not in ("left", "right"):
            raise ValueError(f"series {s.name!r}: axis must be 'left' or 'right', not {s.axis!r}")
        for what, seq in (("values", s.values), ("lows", s.lows), ("highs", s.highs),
                          ("floor", s.floor if s.floor_per_setting else None)):
            if seq is not None and len(seq) != k:
                raise ValueError(f"series {s.name!r}: {len(seq)} {what} for {k} settings")
    colours = [s.colour or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    marks = [MARKERS[i % len(MARKERS)] for i in range(len(series))]
    sides = {side: [i for i, s in enumerate(series) if s.axis == side]
             for side in ("left", "right")}
    small, normal, large = font(12), font(14), font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    # legend entries, laid out in rows that fit the width
    # as wide as the settings' labels need (up to 1400 pixels), unless ``size`` is given; labels
    # wider than their column are staggered on two rows
    left_margin, right_margin = 70, 70 if sides["right"] else 30
    label_width = max(text_width(probe, w, normal) for w in settings)
    width = size[0] if size else int(min(1400, max(600, left_margin + right_margin
                                                   + k * max(80, label_width + 12))))
    stagger = k > 1 and label_width > (width - left_margin - right_margin) / k - 6
    lower = 16 if stagger else 0
    entries: list[tuple[str, list[Colour], str]] = []
    for i, s in enumerate(series):
        missing = all(math.isnan(_number(v)) for v in s.values)
        entries.append((s.name + (" (no values)" if missing else ""), [colours[i]], marks[i]))
    floor_colours = [colours[i] for i, s in enumerate(series)
                     if any(not math.isnan(v) for v in s.floors(k))]
    if floor_colours:
        entries.append((floor_label, floor_colours, "dash"))
    rows: list[list[tuple[str, list[Colour], str]]] = [[]]
    x = left_margin
    for entry in entries:
        advance = 40 + text_width(probe, entry[0], normal)
        if rows[-1] and x + advance - 22 > width - 10:
            rows.append([])
            x = left_margin
        rows[-1].append(entry)
        x += advance
    height = size[1] if size else 440 + 20 * (len(rows) - 1) + lower
    top_margin, bottom_margin = 44, 92 + 20 * (len(rows) - 1) + lower

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1, y0, y1 = left_margin, width - right_margin, top_margin, height - bottom_margin
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw_text(draw, ((x0 + x1) / 2, 10), title, large, "mt")
    xs = [x0 + (i + 0.5) * (x1 - x0) / k for i in range(k)]

    # the axes: each maps [ticks[0], ticks[-1]] onto the plot's height
    scales: dict[str, list[float]] = {}
    for side, members in sides.items():
        if members:
            given = (ticks or {}).get(side)
            chosen = list(given) if given else _axis_ticks([series[i] for i in members], k)
            scales[side] = chosen if len(chosen) > 1 else nice_ticks(chosen[0] or 1.0)

    def to_y(side: str, value: float) -> float:
        lo, hi = scales[side][0], scales[side][-1]
        return y1 - (value - lo) / (hi - lo) * (y1 - y0)

    grid_side = "left" if "left" in scales else "right"
    for side, axis_ticks in scales.items():
        members = sides[side]
        colour = colours[members[0]] if len(members) == 1 else (0, 0, 0)
        for value, words in zip(axis_ticks, tick_labels(axis_ticks), strict=True):
            y = to_y(side, value)
            if side == grid_side:
                draw.line([x0, y, x1, y], fill=GRID_GREY)
            if side == "left":
                draw_text(draw, (x0 - 6, y), words, small, "rm", colour)
            else:
                draw.line([x1, y, x1 + 5, y], fill=colour)
                draw_text(draw, (x1 + 8, y), words, small, "lm", colour)
        name = ", ".join(series[i].title or series[i].name for i in members)
        centre = (16 if side == "left" else width - 14, (y0 + y1) / 2)
        vertical_text(image, centre, name, normal, colour)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))  # over the grid lines' ends

    # the settings, staggered on two rows when their labels are wider than a column
    cell = (x1 - x0) / k
    for i, (x, words) in enumerate(zip(xs, settings, strict=True)):
        draw.line([x, y1, x, y1 + 5], fill=(0, 0, 0))
        draw_text(draw, (x, y1 + 8 + (lower if i % 2 else 0)), words, normal, "mt")
    draw_text(draw, ((x0 + x1) / 2, y1 + 28 + lower), xlabel, normal, "mt")

    # floors, then the series over them
    for i, s in enumerate(series):
        floors = s.floors(k)
        lo_y, hi_y = y1 + 0.5, y0 - 0.5
        if s.floor is not None and not s.floor_per_setting:
            y = to_y(s.axis, floors[0]) if not math.isnan(floors[0]) else math.nan
            if hi_y <= y <= lo_y:
                dashed(draw, y, x0, x1, colours[i])
            continue
        for x, value in zip(xs, floors, strict=True):
            y = to_y(s.axis, value) if not math.isnan(value) else math.nan
            if hi_y <= y <= lo_y:
                dashed(draw, y, x - 0.35 * cell, x + 0.35 * cell, colours[i], dash=4)
    for i, s in enumerate(series):
        colour, above = colours[i], s.axis == "left"
        values = [_number(v) for v in s.values]
        lows = [_number(v) for v in s.lows] if s.lows is not None else [math.nan] * k
        highs = [_number(v) for v in s.highs] if s.highs is not None else [math.nan] * k
        pixels = [(x, to_y(s.axis, v)) for x, v in zip(xs, values, strict=True)]
        run: list[tuple[float, float]] = []
        for (x, y), v in zip(pixels, values, strict=True):  # a line through each unbroken run
            if math.isnan(v):
                if len(run) > 1:
                    draw.line(run, fill=colour, width=2)
                run = []
            else:
                run.append((x, y))
        if len(run) > 1:
            draw.line(run, fill=colour, width=2)
        for (x, y), v, lo, hi in zip(pixels, values, lows, highs, strict=True):
            if math.isnan(v):
                continue
            low_y = to_y(s.axis, lo) if not math.isnan(lo) else y
            high_y = to_y(s.axis, hi) if not math.isnan(hi) else y
            if not math.isnan(lo) and not math.isnan(hi):
                draw.line([x, low_y, x, high_y], fill=colour, width=1)
                draw.line([x - 4, low_y, x + 4, low_y], fill=colour)
                draw.line([x - 4, high_y, x + 4, high_y], fill=colour)
            _marker(draw, x, y, marks[i], colour)
            label_y = min(y, high_y) - 4 if above else max(y, low_y) + 4
            draw_text(draw, (x + 6, label_y), f"{v:{s.digits}}", small,
                      "lb" if above else "lt", colour, halo=True)

    # the legend
    for r, row in enumerate(rows):
        legend_y = y1 + 62 + lower + 20 * r
        x = x0
        for words, entry_colours, mark in row:
            if mark == "dash":
                m = len(entry_colours)
                for j, c in enumerate(entry_colours):
                    offset = 0.0 if m == 1 else -3 + 6 * j / (m - 1)
                    dashed(draw, legend_y + offset, x - 4, x + 14, c, dash=4)
            else:
                _marker(draw, x + 4, legend_y, mark, entry_colours[0])
            draw_text(draw, (x + 18, legend_y), words, normal, "lm")
            x += 40 + text_width(probe, words, normal)
    return image


def labelled_grid(rows: list[tuple[str, torch.Tensor]], *, title: str | None = None,
                  column_labels: list[str] | None = None, cell: int = 48,
                  size: int = 13) -> Image.Image:
    """Rows of images (each ``(k, C, H, W)`` in [0, 1], the same ``k``) as one picture, each
    row labelled on the left; an optional ``title`` above and labels above the columns (a
    restoration's measurement | restorations | truth, a guidance sweep's rows per scale)."""
    columns = rows[0][1].shape[0]
    grid = image_grid(torch.cat([images for _, images in rows]), columns, cell=cell)
    grid = grid.convert("RGB")
    face = font(size)
    measure = ImageDraw.Draw(grid)
    margin = 8 + max(int(measure.textlength(label, font=face)) for label, _ in rows)
    top = 22 if title is not None or column_labels is not None else 0
    width = grid.width + margin
    if title is not None:
        width = max(width, 8 + int(measure.textlength(title, font=face)))
    canvas = Image.new("RGB", (width, grid.height + top), (255, 255, 255))
    canvas.paste(grid, (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title is not None:
        draw_text(draw, (4, top / 2), title, face, anchor="lm")
    if column_labels is not None:
        step = (grid.width - 2) / columns
        for c, label in enumerate(column_labels):
            draw_text(draw, (margin + 1 + (c + 0.5) * step, top / 2), label, face, "mm")
    height = (grid.height - 2) / len(rows)
    for i, (label, _) in enumerate(rows):
        draw_text(draw, (margin - 4, top + 1 + (i + 0.5) * height), label, face, anchor="rm")
    return canvas

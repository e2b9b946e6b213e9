"""``dkit process show KIND_OR_SPEC``: a noise process's key figures, and a plot of its schedule.

``KIND_OR_SPEC`` is a registered process name (parameters as ``key=value`` arguments, e.g.
``dkit process show ddpm schedule=cosine num_steps=500``) or a spec file whose ``process:``
section is used (``key=value`` arguments then override that section).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from diffusers_kit.console import make_console
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.processes.gaussian import nats_to_bits_per_dim
from diffusers_kit.registry import get_registry
from diffusers_kit.run.build import Builder
from diffusers_kit.solvers.grids import resolve_spacing
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document, apply_overrides, load_file
from diffusers_kit.spec.validate import validate_component

SECTION = "process"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("process", help="inspect noise processes")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser(
        "show", help="print a process's key figures (and plot its schedule)",
        description="Print the key figures of a noise process: steps, alpha and sigma ranges, "
                    "SNR range and the prior mismatch KL(q(x_1|x_0) || p(x_1)) for unit-variance "
                    "data. KIND_OR_SPEC is a registered process (with key=value parameters) or a "
                    "spec file (its process section is used; key=value overrides it).",
    )
    show.add_argument("target", metavar="KIND_OR_SPEC")
    show.add_argument("params", nargs="*", metavar="key=value")
    show.add_argument("--plot", metavar="PNG", help="also write alpha(t), sigma(t), log-SNR(t)")
    show.add_argument("--points", type=int, default=400, help="grid points for the plot")
    show.set_defaults(func=show_command)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _is_spec_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def load_process(target: str, params: list[str]) -> tuple[NoiseProcess, dict[str, Any]]:
    """Build the process named by ``target`` (a kind or a spec file) with ``key=value`` params.

    Every user mistake (unknown kind, unknown or invalid parameter, parameters that do not fit
    together) is a :class:`SpecError` naming the field and where it came from.
    """
    registry = get_registry()
    if _is_spec_file(target):
        document = load_file(target)
        if not isinstance(document.data.get(SECTION), dict):
            line, origin = document.locate((SECTION,))
            raise SpecError([SpecIssue((SECTION,), "a process section {kind: ..., ...}",
                                       document.data.get(SECTION), line, origin)], target)
        document.data = {SECTION: document.data[SECTION]}
    else:
        document = Document({SECTION: {"kind": target}}, "command line")
        document.overridden[(SECTION, "kind")] = target
    overrides = [p if p.startswith(f"{SECTION}.") else f"{SECTION}.{p}" for p in params]
    if overrides:
        apply_overrides(document, overrides)
    config = document.data[SECTION]
    issues: list[SpecIssue] = []
    validate_component(registry, SECTION, config, (SECTION,), document, issues)
    if issues:
        raise SpecError(issues, document.origin)
    builder = Builder(registry, document)  # a refusal named as a run's spec would name it
    process = builder.build((SECTION,), SECTION, config)
    if builder.issues:
        raise SpecError(builder.issues, document.origin)
    return process, config


def key_figures(process: NoiseProcess) -> list[tuple[str, str, str]]:
    """``(quantity, value, note)`` rows describing ``process``."""
    ends = torch.tensor([process.t_min, 1.0], dtype=torch.float64)
    alpha, sigma = process.marginal(ends)
    log_snr = process.log_snr(ends)
    g = process.diffusion(ends)
    rows = [("process", repr(process), "")]
    if process.num_steps is not None:
        rows.append(("steps T", str(process.num_steps), "step i at t = i / T"))
    else:
        rows.append(("time", f"continuous, t in [{process.t_min:g}, 1]", "sampling stops at t_min"))
    betas = getattr(process, "betas", None)
    if betas is not None:
        rows.append(("beta_1 .. beta_T", f"{betas[0].item():.4g} .. {betas[-1].item():.4g}",
                     f"max {betas.max().item():.4g}"))
    if hasattr(process, "levels"):
        levels = process.levels()
        rows.append(("noise ladder", f"{len(levels)} levels, sigma {levels[0].item():.4g} .. "
                     f"{levels[-1].item():.4g}", "geometric (NCSN)"))
    rows += [
        ("alpha", f"{alpha[0].item():.6g} .. {alpha[1].item():.6g}", "at t_min .. 1"),
        ("alpha(1)^2", f"{alpha[1].item() ** 2:.4e}", "signal left (abar_T)"),
        ("sigma", f"{sigma[0].item():.6g} .. {sigma[1].item():.6g}", "at t_min .. 1"),
        ("log-SNR", f"{log_snr[0].item():.4f} .. {log_snr[1].item():.4f}",
         f"SNR {math.exp(log_snr[0].item()):.4g} .. {math.exp(log_snr[1].item()):.4g}"),
        ("g", f"{g[0].item():.4g} .. {g[1].item():.4g}", "SDE diffusion at t_min .. 1"),
        ("prior p(x_1)", f"N(0, {process.prior_std():g}^2 I)", ""),
        ("ODE solvers' grid", resolve_spacing(process, "auto"),
         "spacing: auto (the process's default_spacing)"),
    ]
    kl = process.expected_prior_kl(1.0)
    rows.append(("prior mismatch", f"{kl:.4e} nats/dim",
                 f"{nats_to_bits_per_dim(kl, 1):.4e} bits/dim: E KL(q(x_1|x_0) || p(x_1)), "
                 "unit-variance x_0"))
    return rows


def show_command(args: argparse.Namespace) -> int:
    process, config = load_process(args.target, args.params)
    table = Table(title=f"noise process: {config['kind']}", show_lines=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_column("note", style="dim")
    for row in key_figures(process):
        table.add_row(*row)
    console = make_console()
    console.print(table)
    if args.plot:
        if args.points < 2:
            raise SpecError([SpecIssue(("--points",), "at least 2 grid points", args.points,
                                       None, "command line")])
        path = Path(args.plot)
        write_schedule_plot(process, path, points=args.points, title=repr(process))
        console.print(f"[green]wrote[/] {path}")
    return 0


# -- the plot (Pillow only) ------------------------------------------------------------------------
PANEL_WIDTH, PANEL_HEIGHT = 900, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 20, 28, 34
COLOURS = {"alpha(t)": (31, 119, 180), "sigma(t)": (214, 39, 40), "log-SNR(t)": (44, 160, 44)}


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def write_schedule_plot(process: NoiseProcess, path: Path, *, points: int = 400,
                        title: str = "") -> None:
    """Three stacked panels, alpha(t), sigma(t) and log-SNR(t) over [t_min, 1], as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    t = torch.linspace(process.t_min, 1.0, points, dtype=torch.float64)
    alpha, sigma = process.marginal(t)
    curves = {"alpha(t)": alpha, "sigma(t)": sigma, "log-SNR(t)": process.log_snr(t)}
    header = 24
    image = Image.new("RGB", (PANEL_WIDTH, header + PANEL_HEIGHT * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN_LEFT, 6), title, fill="black", font=font)
    for index, (name, values) in enumerate(curves.items()):
        top = header + index * PANEL_HEIGHT
        x0, x1 = MARGIN_LEFT, PANEL_WIDTH - MARGIN_RIGHT
        y0, y1 = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
        finite = values[torch.isfinite(values)]
        low, high = (finite.min().item(), finite.max().item()) if len(finite) else (0.0, 1.0)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        pad = 0.05 * (high - low)
        low, high = low - pad, high + pad
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        draw.text((x0, top + 8), name, fill=COLOURS[name], font=font)
        for value in _ticks(low, high):
            y = y1 - (value - low) / (high - low) * (y1 - y0)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.line([x0 + 1, y, x1 - 1, y], fill=(235, 235, 235))
            draw.text((6, y - 6), f"{value:.3g}", fill="black", font=font)
        for value in _ticks(process.t_min, 1.0, 6):
            x = x0 + (value - process.t_min) / (1.0 - process.t_min) * (x1 - x0)
            draw.line([x, y1, x, y1 + 4], fill="black")
            draw.text((x - 10, y1 + 8), f"{value:.2g}", fill="black", font=font)
        xs = x0 + (t - process.t_min) / (1.0 - process.t_min) * (x1 - x0)
        ys = y1 - (values - low) / (high - low) * (y1 - y0)
        keep = torch.isfinite(ys)
        line = list(zip(xs[keep].tolist(), ys[keep].tolist(), strict=True))
        if len(line) > 1:
            draw.line(line, fill=COLOURS[name], width=2)
        draw.text((x1 - 12, y1 + 20), "t", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.replace(path)

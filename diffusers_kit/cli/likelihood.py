"""``dkit likelihood RUN_DIR``: bits/dim of held-out data through the probability-flow ODE.

The exact likelihood (instantaneous change of variables; exact trace or Hutchinson), with the
DDPM variational bound beside it on request (``--vlb``), and the encode -> decode reconstruction
error. Settings default to the spec's ``nll`` metric when it has one. Writes
``RUN_DIR/likelihood.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.table import Table

from diffusers_kit.cli.main import seed_option
from diffusers_kit.cli.sample import load_run
from diffusers_kit.console import make_console
from diffusers_kit.latent import LATENT_PREFIX
from diffusers_kit.likelihood import decode, encode
from diffusers_kit.metrics.base import metric_figures
from diffusers_kit.registry import get_registry
from diffusers_kit.run_folder import write_json
from diffusers_kit.spec.errors import SpecError, SpecIssue

OPTIONS = ("n", "divergence", "probe", "method", "rtol", "atol", "bins", "vlb", "vlb_steps")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("likelihood", help="bits/dim of held-out data (PF-ODE)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--n", type=int, help="held-out examples (default 128)")
    parser.add_argument("--divergence", choices=("auto", "exact", "hutchinson"))
    parser.add_argument("--probe", choices=("rademacher", "gaussian"))
    parser.add_argument("--method", choices=("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"))
    parser.add_argument("--rtol", type=float)
    parser.add_argument("--atol", type=float)
    parser.add_argument("--bins", type=int, help="levels of the quantised data (0: continuous)")
    parser.add_argument("--vlb", action="store_true", default=None,
                        help="also compute the DDPM variational bound")
    parser.add_argument("--vlb-steps", dest="vlb_steps", type=int)
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.set_defaults(func=likelihood_command)


def likelihood_command(args: argparse.Namespace) -> int:
    spec, components = load_run(args.run_dir)
    settings: dict = {}
    for entry in spec.evaluate.metrics:
        if entry["kind"] == "nll":
            settings = {k: v for k, v in entry.items() if k != "kind"}
    for key in OPTIONS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if settings.get("bins") == 0:
        settings["bins"] = None
    try:
        metric = get_registry().build("metric", {"kind": "nll", **settings})
    except (ValueError, TypeError) as exc:
        raise SpecError([SpecIssue(("dkit likelihood",), f"valid nll settings ({exc})",
                                   settings, None, "command line")]) from None
    diffusion = components.diffusion
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    seen = diffusion.model_data(components.data)  # a latent model's encoded data
    prefix = LATENT_PREFIX if seen is not components.data else ""
    with diffusion.sampling_weights() as model:
        metrics = metric_figures(metric, torch.empty(0), components.data, generator, model,
                                 model_data=seen)
        with torch.no_grad():
            x = seen.heldout[: min(metric.n, 32)].to(diffusion.device, torch.float32)
            back = decode(model, encode(model, x))
        metrics[f"{prefix}reconstruction_max_abs_error"] = float((back - x).abs().max())
        metrics[f"{prefix}reconstruction_rms_error"] = float((back - x).pow(2).mean().sqrt())
    metrics["seconds"] = time.perf_counter() - started
    path = Path(args.run_dir) / "likelihood.json"
    write_json(path, {"settings": settings, **metrics})
    table = Table(title=f"dkit likelihood {spec.name}", header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}")
    console = make_console()
    console.print(table)
    console.print(f"written to [bold]{path}[/]", soft_wrap=True)
    return 0

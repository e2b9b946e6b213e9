"""``dkit restore RUN_DIR``: solve an inverse problem with a trained model.

Held-out images (or ``--images FILE``) are measured through ``--operator`` (a forward model:
``inpaint``, ``colorize``, ``super_resolution``, ``blur``, ``matrix``, ``denoise``, or a
plugin's), restored by ``--method`` (``replacement``, ``pigdm``, ``dps``: guidance terms that
hold the operator) with any solver, and judged: PSNR, SSIM, consistency ``||y - A x||``, NFE,
seconds. Results go to ``RUN_DIR/restoration/<method>-<operator>-<timestamp>/``: ``restore.png``
(measurement | restorations | truth), ``restore.npz``, ``restore.json``. The options become the
spec's ``restore:`` section, so every mistake is reported with its field.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

from rich.table import Table
from rich.text import Text

from diffusers_kit.console import make_console
from diffusers_kit.metrics.floor import summarize
from diffusers_kit.restore import restoration_images, restore, write_restoration
from diffusers_kit.run import open_run
from diffusers_kit.run_folder import follow_latest
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import component_option


def _mapping(flag: str, text: str, example: str) -> dict:
    return component_option(flag, text, f"a name or a YAML mapping such as {example}")


def default_method(run_dir: str) -> str:
    """``pigdm`` (the best 50-step method in docs/inverse.md), or ``dps`` for a latent diffusion
    run: its decoder is not linear, so only DPS measures through it."""
    import yaml

    try:
        resolved = yaml.safe_load((Path(run_dir) / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "pigdm"  # the run folder's own problems are reported when it is opened
    return "dps" if isinstance(resolved, dict) and resolved.get("latent") else "pigdm"


def restore_overrides(args: argparse.Namespace) -> list[str]:
    """The command's options as overrides of the spec's ``restore`` section."""
    method = _mapping("--method", args.method or default_method(args.run_dir),
                      "'{kind: dps, zeta: 2}'")
    if args.operator is not None:
        method["operator"] = _mapping("--operator", args.operator,
                                      "'{kind: inpaint, mask: box}'")
    elif "operator" not in method:
        raise SpecError([SpecIssue(("--operator",), "a forward model, e.g. '{kind: inpaint, "
                                   "mask: box}' (or an operator inside --method)", None, None,
                                   "command line")])
    overrides = [f"restore.method={json.dumps(method)}"]
    for field, value in (("n", args.n), ("samples_per_image", args.samples_per_image)):
        if value is not None:
            overrides.append(f"restore.{field}={value}")
    if args.images is not None:
        overrides.append(f"restore.images={json.dumps(args.images)}")
    if args.solver is not None:
        solver = _mapping("--solver", args.solver, "'{kind: ddim, steps: 50}'")
        overrides.append(f"restore.solver={json.dumps(solver)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("restore", help="solve an inverse problem (inpainting, "
                                   "colorization, super-resolution, deblurring) with a run")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value",
                        help="override fields of the run's spec")
    parser.add_argument("--operator", help="forward model, name or YAML mapping, e.g. "
                                           "'{kind: inpaint, mask: box, sigma_y: 0.05}'")
    parser.add_argument("--method", default=None,
                        help="replacement, pigdm or dps (default pigdm: the best 50-step method "
                             "in docs/inverse.md; dps for a latent diffusion run; or a YAML "
                             "mapping with options, e.g. '{kind: dps, zeta: 2}')")
    parser.add_argument("--n", type=int, help="images to restore (default 8)")
    parser.add_argument("--samples-per-image", type=int, help="restorations per image")
    parser.add_argument("--images", help="an .npz / .npy file of images (default: the data "
                                         "set's held-out images)")
    parser.add_argument("--solver", help="solver name or YAML mapping (default: the spec's)")
    parser.add_argument("--seed", type=int, help="seed of the measurement noise and sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    parser.set_defaults(func=restore_command)


def restore_command(args: argparse.Namespace) -> int:
    overrides = restore_overrides(args) + list(args.overrides)  # the user's fields win
    spec, components = open_run(args.run_dir, overrides)
    section = spec.restore
    assert section is not None and components.restore_method is not None
    assert components.restore_solver is not None
    try:
        images = restoration_images(section.images, components.data, section.n)
    except ValueError as exc:
        raise SpecError([SpecIssue(("--images",), str(exc), section.images, None,
                                   "command line")]) from None
    method = section.method["kind"]
    operator = section.method["operator"]["kind"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = follow_latest(Path(args.run_dir).expanduser()) / "restoration" / (
        f"{method}-{operator}-{stamp}")
    console = make_console(stderr=True, quiet=args.quiet)
    solver = components.restore_solver
    with console.status(f"restoring {len(images)} images with {method} ({operator})"):
        result = restore(components.diffusion, components.restore_method, images, solver,
                         samples_per_image=section.samples_per_image, seed=spec.seed,
                         batch_size=section.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    write_restoration(result, out, components.dataset)
    resolved = components.resolved.get("restore") or {}
    (out / "spec.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n",
                                   encoding="utf-8")
    if not args.quiet:
        table = Table(title=f"dkit restore: {method} on {operator}", header_style="bold")
        table.add_column("metric")
        table.add_column(Text("value [interval]  n"), justify="right")
        for key, text in summarize(result.metrics):
            table.add_row(key, Text(text))
        make_console().print(table)
        console.print(f"results in [bold]{out}[/] (restore.png, restore.npz, restore.json)",
                      soft_wrap=True)
    return 0

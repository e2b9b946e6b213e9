"""``dkit restore RUN_DIR``: solve an inverse problem with a trained model.

Held-out images (or ``--images FILE``) are measured through ``--operator`` (a forward model:
``inpaint``, ``colorize``, ``super_resolution``, ``blur``, ``matrix``, ``denoise``, or a
plugin's), restored by ``--method`` (``replacement``, ``diffpir``, ``ddnm``, ``pigdm``,
``dps``: guidance terms that hold the operator, with any solver; ``ddrm``, which takes the
sampler's steps itself, with ``ddim``) and judged: PSNR, SSIM, consistency ``||y - A x||``, NFE,
seconds. Results go to ``RUN_DIR/restoration/<method>-<operator>-<timestamp>/``: ``restore.png``
(measurement | restorations | truth), ``restore.npz``, ``restore.json``. The options set the
spec's ``restore:`` section (as values, blamed on their option when wrong) and the restoration
runs through the same routine as a run's restore stage.

``--shard K/N`` (or, under torchrun, ``RANK/WORLD_SIZE``) restores only shard ``K`` of ``N``:
a contiguous block of whole batches of the ``n x samples_per_image`` restorations, each batch
whole images (:func:`diffusers_kit.cli.merge.plan_shard`), into
``RUN_DIR/restoration/shards-<method>-<operator>-<hash>/shard-K-of-N/`` with a manifest
``shard.json``; ``dkit merge`` joins the shards into the arrays of one unsharded restoration
with the same ``restore.batch_size``, bit for bit, and judges them again (docs/scaling.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from diffusers_kit.cli import merge as shards
from diffusers_kit.cli.main import seed_option
from diffusers_kit.console import make_console
from diffusers_kit.metrics.floor import summarize
from diffusers_kit.run.build import open_run, set_option
from diffusers_kit.run.stages import progress_bars, restore_images, restore_into
from diffusers_kit.run_folder import follow_latest, output_folder, write_json
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document, component_option

if TYPE_CHECKING:
    from rich.console import Console

    from diffusers_kit.run import Components
    from diffusers_kit.spec.models import Spec


def _mapping(flag: str, text: str, example: str) -> dict:
    return component_option(flag, text, f"a name or a YAML mapping such as {example}")


def default_method(resolved: dict[str, Any]) -> str:
    """``pigdm`` (any solver, no step size to tune; within 1.7 dB of the best 50-step method on
    every Gaussian task of docs/inverse.md's table), or ``dps`` for a latent diffusion
    run (``resolved``: the run's resolved spec): its decoder is not linear, so only DPS
    measures through it."""
    return "dps" if resolved.get("latent") else "pigdm"


def restore_options(args: argparse.Namespace) -> Callable[[Document], None]:
    """The command's options set as the fields of the run spec's ``restore`` section they
    stand for (values, not text: each problem is blamed on its option)."""

    def apply(document: Document) -> None:
        text = args.method or default_method(document.data)
        method = _mapping("--method", text, "'{kind: dps, zeta: 2}'")
        set_option(document, ("restore", "method"), method,
                   f"--method {args.method}" if args.method else f"the default method {text}")
        if args.operator is not None:
            operator = _mapping("--operator", args.operator, "'{kind: inpaint, mask: box}'")
            set_option(document, ("restore", "method", "operator"), operator,
                       f"--operator {args.operator}")
        elif "operator" not in method:
            raise SpecError([SpecIssue(("--operator",), "a forward model, e.g. '{kind: "
                                       "inpaint, mask: box}' (or an operator inside --method)",
                                       None, None, "command line")])
        for field, option, value in (("n", "--n", args.n),
                                     ("samples_per_image", "--samples-per-image",
                                      args.samples_per_image),
                                     ("images", "--images", args.images)):
            if value is not None:
                set_option(document, ("restore", field), value, f"{option} {value}")
        if args.solver is not None:
            solver = _mapping("--solver", args.solver, "'{kind: ddim, steps: 50}'")
            set_option(document, ("restore", "solver"), solver, f"--solver {args.solver}")
        if args.seed is not None:
            set_option(document, ("seed",), args.seed, f"--seed {args.seed}")

    return apply


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("restore", help="solve an inverse problem (inpainting, "
                                   "colorization, super-resolution, deblurring) with a run")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value",
                        help="override fields of the run's spec")
    parser.add_argument("--operator", help="forward model, name or YAML mapping, e.g. "
                                           "'{kind: inpaint, mask: box, sigma_y: 0.05}'")
    parser.add_argument("--method", default=None,
                        help="replacement, diffpir, ddnm, pigdm, dps, or ddrm (with --solver "
                             "ddim) (default pigdm: any solver, no step size to tune; "
                             "docs/inverse.md compares them; dps for a latent diffusion run; "
                             "or a YAML "
                             "mapping with options, e.g. '{kind: dps, zeta: 2}')")
    parser.add_argument("--n", type=int, help="images to restore (default 8)")
    parser.add_argument("--samples-per-image", type=int, help="restorations per image")
    parser.add_argument("--images", help="an .npz / .npy file of images (default: the data "
                                         "set's held-out images)")
    parser.add_argument("--solver", help="solver name or YAML mapping (default: the spec's)")
    parser.add_argument("--seed", type=seed_option,
                        help="seed of the measurement noise and sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    parser.add_argument("--shard", metavar="K/N",
                        help="restore only shard K of N (K from 0): a block of whole images, "
                             "into RUN_DIR/restoration/shards-.../shard-K-of-N; join them "
                             "with dkit merge. Under torchrun the default is RANK/WORLD_SIZE")
    parser.set_defaults(func=restore_command)


def restore_command(args: argparse.Namespace) -> int:
    shard = shards.shard_from(args)
    if shard is not None:
        shards.use_local_gpu()
    # the options set the spec's restore section; the user's field overrides come after
    spec, components = open_run(args.run_dir, list(args.overrides),
                                options=restore_options(args))
    section = spec.restore
    assert section is not None
    method = section.method["kind"]
    operator = section.method["operator"]["kind"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = follow_latest(Path(args.run_dir).expanduser()) / "restoration"
    console = make_console(stderr=True, quiet=args.quiet)
    if shard is not None:
        return _restore_shard(args, spec, components, shard, parent, console)
    # created atomically with a unique name, removed again if the restoration fails
    with output_folder(parent, f"{method}-{operator}-{stamp}") as out:
        result = restore_into(out, spec, components, progress_bars(console, args.quiet))
        write_json(out / "spec.json", components.resolved.get("restore") or {})
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


def _restore_shard(args: argparse.Namespace, spec: Spec, components: Components,
                   shard: tuple[int, int], parent: Path, console: Console) -> int:
    """Restore shard ``K/N`` into its own folder with its manifest (the shard helpers of
    :mod:`diffusers_kit.cli.merge`, shared with ``dkit sample --shard``)."""
    section = spec.restore
    assert section is not None
    k, count = shard
    per_image = section.samples_per_image
    images = len(restore_images(spec, components))
    rows = images * per_image
    batch, start, stop = shards.plan_shard(shard, rows, section.batch_size,
                                           components.diffusion.network.data_shape,
                                           most=f"{images} shards (each restores at least one of "
                                                f"the {images} images)",
                                    multiple=per_image, batch_field="restore.batch_size")
    section.batch_size = batch  # given, not automatic: no batch is ever halved
    resolved = dict(components.resolved.get("restore") or {})
    # the solver used (the sample section's when the restore section names none)
    resolved["solver"] = resolved.get("solver") or components.resolved["sample"]["solver"]
    resolved["batch_size"] = batch
    if resolved.get("images", "heldout") != "heldout":  # recorded as a path from anywhere
        resolved["images"] = str(Path(resolved["images"]).expanduser().resolve())
    folder, checkpoint = shards.run_identity(args.run_dir)
    shared = {"kind": "restore", "run": str(folder), "checkpoint_sha256": checkpoint,
              "seed": spec.seed, "n": rows, "shards": count, "batch_size": batch,
              "restore": resolved, "images": images}
    label = f"{section.method['kind']}-{section.method['operator']['kind']}"
    with shards.shard_folder(parent, label, shared, shard) as out:
        result = restore_into(out, spec, components, progress_bars(console, args.quiet),
                              rows=(start, stop))
        shards.write_manifest(out, shared, shard, (start, stop), nfe=result.nfe,
                              seconds=result.seconds)
    console.print(f"shard {k}/{count}: images {start // per_image}..{stop // per_image - 1} "
                  f"of {images} ({per_image} restorations each), {result.seconds:.1f} s; "
                  f"results in [bold]{escape(str(out))}[/]; join the shards with dkit merge "
                  f"{escape(str(out.parent))} -o OUT", soft_wrap=True)
    return 0

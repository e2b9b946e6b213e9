"""``dkit sample RUN_DIR``: draw new samples from a trained run with any solver.

``--solver`` takes a registered name or an inline YAML mapping (``"{kind: ddim, steps: 20}"``);
``--guidance`` and ``--labels`` replace the spec's guidance terms and the classes to draw
(``--labels all`` gives one grid row per class);
``--progressive`` writes the x0_hat predictions over time (Ho et al. 2020, fig. 6; for a solver
that predicts no x0_hat, such as annealed Langevin, the state x over time, and it says so; for
2-D data a row of scatter plots, one per recorded step); ``--init FILE`` starts from given
noise ``x_T`` (an ``.npz`` / ``.npy`` array of shape ``(n, *data_shape)``: key ``x_T`` or the
only array; it sets ``n``) instead of the prior draw from the seed; ``--interpolate K`` encodes
pairs of held-out examples through the probability-flow ODE, interpolates their latents
spherically and decodes K points between them, as an image strip. Results go to
``RUN_DIR/sampling/<solver>-<timestamp>/``, created once the samples exist and removed again
when the command fails, so a failed command leaves no folder; the run's own files are not
touched. Without ``sample.batch_size`` the samples are drawn in batches that fit in memory
(:func:`diffusers_kit.diffusion.default_batch_size`); memory that still runs out is exit status 3
with the batch to try.

``--shard K/N`` (or, under torchrun, ``RANK/WORLD_SIZE``) draws only shard ``K`` of ``N``: a
contiguous block of whole batches of the run's ``sample.n`` samples
(:func:`diffusers_kit.cli.merge.shard_range`), into
``RUN_DIR/sampling/shards-<solver>-<hash>/shard-K-of-N/`` with a manifest ``shard.json``;
``dkit merge`` joins the shards into samples equal, bit for bit, to an unsharded draw with the
same batch size (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.markup import escape

from diffusers_kit import latent
from diffusers_kit.cli import merge as shards
from diffusers_kit.cli.main import ENVIRONMENT_ERROR, seed_option
from diffusers_kit.console import make_console
from diffusers_kit.devices import is_out_of_memory
from diffusers_kit.diffusion import SamplingOutOfMemory
from diffusers_kit.likelihood import decode, encode, slerp
from diffusers_kit.report import image_grid, scatter_plot
from diffusers_kit.run import open_run
from diffusers_kit.run.build import set_option
from diffusers_kit.run.stages import require_finite
from diffusers_kit.run_folder import output_folder, write_json
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import component_option

if TYPE_CHECKING:
    from diffusers_kit.run import Components
    from diffusers_kit.solvers.base import SampleResult
    from diffusers_kit.spec.loader import Document
    from diffusers_kit.spec.models import Spec


def load_run(run_dir: str | Path, overrides: list[str] | None = None,
             solver: str | None = None,
             options: Callable[[Document], None] | None = None):  # type: ignore[no-untyped-def]
    """A finished run's spec and components, its checkpoint loaded
    (:func:`diffusers_kit.run.open_run`)."""
    return open_run(run_dir, overrides, solver, options)


def prompt_options(prompts: list[str] | None, negative: str | None
                   ) -> Callable[[Document], None] | None:
    """``--prompt`` / ``--negative-prompt`` as the prompts of the run's ``diffusers_text``
    conditioner (an imported text-to-image pipeline): the prompts pick the context, not the
    weights, so they may change on a finished run. New prompts draw ``all`` of them (equal
    blocks) unless ``--labels`` says otherwise."""
    if not prompts and negative is None:
        return None

    def apply(document: Document) -> None:
        network = document.data.get("network")
        conditioner = network.get("conditioner") if isinstance(network, dict) else None
        if not isinstance(conditioner, dict) or conditioner.get("kind") != "diffusers_text":
            option = "--prompt" if prompts else "--negative-prompt"
            given = prompts[0] if prompts else negative
            raise SpecError([SpecIssue((option,), "a run whose network has a diffusers_text "
                                       "conditioner (a text-to-image pipeline imported with "
                                       "dkit import)", given, None, "command line")])
        where = ("network", "conditioner")
        if prompts:
            set_option(document, (*where, "prompts"), list(prompts), "--prompt")
            sample = document.data.get("sample")
            if isinstance(sample, dict):
                sample["labels"] = "all"
        if negative is not None:
            set_option(document, (*where, "negative_prompt"), negative, "--negative-prompt")

    return apply


def conditioning_overrides(guidance: list[str] | None, labels: str | None) -> list[str]:
    """``--guidance`` / ``--labels`` as overrides of ``sample.guidance`` / ``sample.labels``."""
    overrides = []
    if guidance:
        terms: list[dict] = []
        for text in guidance:
            if text.strip() == "none":
                continue
            terms.append(component_option("--guidance", text, "a guidance name or a YAML "
                                          "mapping such as '{kind: classifier_free, scale: 4}'"))
        overrides.append(f"sample.guidance={json.dumps(terms)}")
    if labels is not None:
        text = labels.strip()
        if text == "none":
            value: object = None
        elif text == "all":
            value = "all"
        else:
            try:
                parts = [int(part) for part in text.split(",")]
            except ValueError:
                raise SpecError([SpecIssue(("--labels",), "all, none, a class (3) or a list of "
                                           "classes (0,2,4)", labels, None, "command line")]
                                ) from None
            value = parts[0] if len(parts) == 1 and "," not in text else parts
        overrides.append(f"sample.labels={json.dumps(value)}")
    return overrides


@dataclass
class Drawn:
    """What :func:`draw_samples` drew: the solver's result, its samples on the CPU, the sampling
    time and the facts ``sampling.json`` records."""

    result: SampleResult
    samples: torch.Tensor
    seconds: float
    info: dict[str, Any]


def draw_samples(spec: Spec, components: Components, out: Path, n: int, seed: int, *,
                 stem: str = "samples",
                 progress: Callable[[int], None] | bool | None = None,
                 x_T: torch.Tensor | None = None, first: int | None = None) -> Drawn:
    """Draw ``n`` samples of a loaded run (``load_run``) as ``dkit sample`` does: its solver,
    guidance and labels, from ``seed``; then create ``out`` when missing and write
    ``out/<stem>.npz`` (samples, display, labels) and ``out/<stem>.png`` (an image grid, or a
    scatter over the held-out data) with :meth:`SampleResult.save
    <diffusers_kit.solvers.base.SampleResult.save>`. ``progress(k)`` is told of every k solver
    steps done; ``progress=True`` draws a progress bar. ``x_T`` (``n`` start points) replaces
    the prior draw. ``first`` (a shard's first global index) draws the samples
    ``first .. first + n - 1`` of the run's ``sample.n``, with their labels: exactly those rows
    of the unsharded draw (:meth:`Diffusion.sample <diffusers_kit.diffusion.Diffusion.sample>`)."""
    diffusion, dataset = components.diffusion, components.dataset
    labels = components.labels
    if first is not None and labels is not None:
        labels = labels[first:first + n]  # laid out for the whole sample.n: this shard's rows
    started = time.perf_counter()
    result = diffusion.sample(n, components.solver, seed=seed,
                              batch_size=spec.sample.batch_size, progress=progress,
                              guidance=components.guidance, labels=labels,
                              x_T=x_T, first=first or 0)
    seconds = time.perf_counter() - started
    samples = result.samples.float().cpu()
    require_finite(samples, "sample", f"solver {spec.sample.solver['kind']}")  # exit 1
    result.save(out, dataset, columns=spec.output.grid_columns, stem=stem,
                reference=components.data.heldout if components.data is not None else None)
    info: dict[str, Any] = {"solver": components.resolved["sample"]["solver"], "n": n,
                            "seed": seed,
                            "guidance": components.resolved["sample"].get("guidance", []),
                            "labels": spec.sample.labels, "nfe": result.nfe,
                            "nfe_per_sample_batch": result.nfe, "seconds": seconds,
                            "batch_size": result.batch_size}
    conditioner = getattr(diffusion.network, "conditioner", None)
    if hasattr(conditioner, "prompts"):  # a text-to-image model: what its labels meant
        info["prompts"] = list(conditioner.prompts)
        info["negative_prompt"] = getattr(conditioner, "negative_prompt", "")
    return Drawn(result, samples, seconds, info)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample a trained run again, with any solver")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value",
                        help="override fields of the run's spec, e.g. sample.n=16")
    parser.add_argument("--solver", help="solver name or YAML mapping, e.g. "
                                         "'{kind: dpm_solver_2m, steps: 10}'")
    parser.add_argument("--guidance", action="append", metavar="TERM",
                        help="a guidance term, name or YAML mapping, e.g. "
                             "'{kind: classifier_free, scale: 4}' (repeat to add terms; "
                             "'none' samples without the spec's guidance)")
    parser.add_argument("--labels", metavar="CLASSES",
                        help="classes to draw: all, one class (3) or a list (0,2,4); "
                             "'none' for unconditional samples")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text-to-image run's prompt (repeat it: labels 0, 1, ...; all "
                             "are drawn unless --labels says which), replacing its prompts")
    parser.add_argument("--negative-prompt", metavar="TEXT",
                        help="a text-to-image run's null prompt, which classifier-free "
                             "guidance steers away from")
    parser.add_argument("--n", type=int, help="number of samples (default: the spec's)")
    parser.add_argument("--seed", type=seed_option, help="sampling seed (default: the spec's)")
    parser.add_argument("--ema-sigma-rel", metavar="SIGMA_REL",
                        help="sample with the post-hoc EMA of this relative length, "
                             "reconstructed from the run's snapshots (train.post_hoc_ema); "
                             "the same as sample.ema_sigma_rel=SIGMA_REL")
    parser.add_argument("--init", metavar="FILE",
                        help="start from this noise x_T instead of the prior: an .npz (key "
                             "x_T or its only array) or .npy of shape (n, *data_shape); sets n")
    parser.add_argument("--progressive", action="store_true",
                        help="also write x0_hat over time for a few samples (2-D data: a "
                             "scatter per step)")
    parser.add_argument("--interpolate", type=int, default=0, metavar="K",
                        help="also write a strip of K slerp points between encoded examples")
    parser.add_argument("--pairs", type=int, default=4, help="rows of the interpolation strip")
    parser.add_argument("--shard", metavar="K/N",
                        help="draw only shard K of N (K from 0): the samples K*n//N .. "
                             "(K+1)*n//N - 1, into RUN_DIR/sampling/shards-.../shard-K-of-N; "
                             "join them with dkit merge. Under torchrun the default is "
                             "RANK/WORLD_SIZE")
    parser.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    for flag, value in (("--n", args.n), ("--interpolate", args.interpolate),
                        ("--pairs", args.pairs)):
        if value is not None and value < (0 if flag == "--interpolate" else 1):
            raise SpecError([SpecIssue((flag,), "a positive number", value, None,
                                       "command line")])
    overrides = list(args.overrides) + conditioning_overrides(args.guidance, args.labels)
    if args.ema_sigma_rel is not None:
        overrides.append(f"sample.ema_sigma_rel={args.ema_sigma_rel}")
    init = None if args.init is None else read_init(args.init)
    if init is not None:
        if args.n is not None and args.n != len(init):
            raise SpecError([SpecIssue(("--n",), f"the number of start points in --init "
                                       f"({len(init)}), or no --n", args.n, None,
                                       "command line")])
        args.n = len(init)
    if args.n is not None:
        overrides.append(f"sample.n={args.n}")  # labels are laid out for this many samples
    shard = shards.shard_from(args)
    if shard is not None:
        for flag, used in (("--progressive", args.progressive),
                           ("--interpolate", args.interpolate)):
            if used:
                raise SpecError([SpecIssue((flag,), "no --progressive or --interpolate with a "
                                           "shard (draw them in an unsharded dkit sample)",
                                           used, None, "command line")])
        shards.use_local_gpu()
    spec, components = load_run(args.run_dir, overrides, args.solver,
                                prompt_options(args.prompt, args.negative_prompt))
    if init is not None:
        expected = (len(init), *components.diffusion.network.data_shape)
        if tuple(init.shape) != tuple(expected):
            raise SpecError([SpecIssue(("--init",), f"start noise of shape (n, *data_shape) = "
                                       f"{expected}", f"shape {tuple(init.shape)}",
                                       None, "command line")])
        args.init_noise = init
    if shard is not None:
        return _sample_shard(args, spec, components, shard)
    name = spec.sample.solver["kind"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # created atomically with a unique name (two commands in the same second: two folders),
    # removed again with sampling/ when the command fails, so no partial folder is left
    try:
        with output_folder(Path(args.run_dir).expanduser() / "sampling",
                           f"{name}-{stamp}") as out:
            return _sample_into(args, spec, components, out)
    except Exception as exc:
        if is_out_of_memory(exc):
            return _report_out_of_memory(exc, spec)
        raise


def _sample_shard(args: argparse.Namespace, spec: Spec, components: Components,
                  shard: tuple[int, int]) -> int:
    """Draw shard ``K/N`` of the run's samples into its own folder with its manifest
    (:mod:`diffusers_kit.cli.merge`: :func:`plan_shard`, :func:`shard_folder`)."""
    import hashlib

    k, count = shard
    n = args.n or spec.sample.n
    batch, start, stop = shards.plan_shard(shard, n, spec.sample.batch_size,
                                           components.diffusion.network.data_shape,
                                           most=f"n = {n} shards (each draws at least one sample)")
    spec.sample.batch_size = batch  # given, not automatic: no batch is ever halved
    seed = spec.seed if args.seed is None else args.seed
    folder, checkpoint = shards.run_identity(args.run_dir)
    init = getattr(args, "init_noise", None)
    resolved = components.resolved["sample"]
    shared = {"run": str(folder), "checkpoint_sha256": checkpoint,
              "seed": seed, "n": n, "shards": count, "batch_size": batch,
              "solver": resolved["solver"],
              "guidance": resolved.get("guidance", []), "labels": spec.sample.labels,
              "init": None if init is None else hashlib.sha256(init.numpy().tobytes()
                                                               ).hexdigest()}
    try:
        with shards.shard_folder(Path(args.run_dir).expanduser() / "sampling",
                                 spec.sample.solver["kind"], shared, shard) as out:
            drawn = draw_samples(spec, components, out, stop - start, seed, progress=True,
                                 x_T=None if init is None else init[start:stop], first=start)
            shards.write_manifest(out, shared, shard, (start, stop), nfe=drawn.result.nfe,
                                  seconds=drawn.seconds, batch_size=drawn.result.batch_size)
    except Exception as exc:
        if is_out_of_memory(exc):
            return _report_out_of_memory(exc, spec)
        raise
    console = make_console()
    console.print(f"shard {k}/{count}: samples {start}..{stop - 1} of {n} with "
                  f"[bold]{spec.sample.solver['kind']}[/], {drawn.seconds:.1f} s", soft_wrap=True)
    console.print(f"results in [bold]{escape(str(out))}[/]; join the shards with dkit merge "
                  f"{escape(str(out.parent))} -o OUT", soft_wrap=True)
    return 0


def read_init(path: str) -> torch.Tensor:
    """The start noise of ``--init``: an ``.npy`` array, or an ``.npz`` with key ``x_T`` or a
    single array; float32, finite, at least 2-D (``(n, *data_shape)``). Mistakes are exit 2."""
    import numpy as np

    def fail(expected: str, given: object) -> SpecError:
        return SpecError([SpecIssue(("--init",), expected, given, None, "command line")])

    from diffusers_kit.arrays import ArrayFile

    if not Path(path).expanduser().is_file():
        raise fail("an existing .npz or .npy file of start noise", f"no such file: {path}")
    try:
        with ArrayFile(path) as file:  # the one array reader: refuses damaged, empty, NaN
            names = file.names
            if names and "x_T" not in names and len(names) != 1:
                raise fail("an .npz with an array named x_T, or a single array",
                           f"arrays {', '.join(names)} in {path}")
            array = file.array(("x_T" if "x_T" in names else names[0]) if names else None)
    except (OSError, ValueError) as exc:
        raise fail(f"a usable .npz or .npy file of start noise ({exc})", path) from None
    if array.ndim < 2:
        raise fail("a numeric array of shape (n, *data_shape)",
                   f"a {array.dtype} array of shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _report_out_of_memory(exc: Exception, spec: Spec) -> int:
    """Exit status 3 (the environment: docs/errors.md) with what to change, no traceback."""
    if isinstance(exc, SamplingOutOfMemory):
        text = str(exc)
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = (f"out of memory with {spec.sample.n} samples ({first}): lower --n or set "
                "sample.batch_size")
    make_console(stderr=True).print(f"[bold red]error:[/] {escape(text)}; nothing was written",
                                    soft_wrap=True)
    return ENVIRONMENT_ERROR


def _sample_into(args: argparse.Namespace, spec: Spec, components: Components,
                 out: Path) -> int:
    import numpy as np
    from PIL import Image

    diffusion, dataset, solver = components.diffusion, components.dataset, components.solver
    n = args.n or spec.sample.n
    seed = spec.seed if args.seed is None else args.seed
    name = spec.sample.solver["kind"]
    init = getattr(args, "init_noise", None)
    drawn = draw_samples(spec, components, out, n, seed, progress=True, x_T=init)
    result, seconds, info = drawn.result, drawn.seconds, drawn.info
    if init is not None:
        info["init"] = str(Path(args.init).expanduser().resolve())
    image = dataset.modality == "image"
    notes: list[str] = []
    if args.progressive:
        # Diffusion.sample merges only trajectories across batches: draw the few progressive
        # rows directly from the solver, with the sampling weights; recording x too shows
        # something for a solver that predicts no x0_hat (annealed Langevin)
        rows = min(8 if image else 256, n)  # a scatter needs more than 8 points to show
        shape = (rows, *diffusion.network.data_shape)
        solver.keep_x0 = solver.keep_trajectory = True  # every solver here takes them
        with diffusion.sampling_weights() as model, torch.no_grad():
            generator = torch.Generator(diffusion.device).manual_seed(seed)
            progressive = solver.sample(model, shape, generator=generator,
                                        x_T=None if init is None else init[:rows])
        frames_kept, shown = progressive.x0_predictions, "x0_hat"
        if not frames_kept and progressive.trajectory:
            frames_kept, shown = progressive.trajectory, "x"
            notes.append(f"note: --progressive: {name} predicts no x0_hat, so progressive.png "
                         f"shows the state x as it is refined instead")
        if frames_kept and diffusion.autoencoder is not None:  # latents: show their images
            frames_kept = [latent.decode(diffusion.autoencoder, frame) for frame in frames_kept]
        if frames_kept:
            every = _evenly(len(frames_kept), 10)
            frames = torch.stack([frames_kept[i].float().cpu() for i in every], 1)
            columns = len(every)
            if image:
                strip = image_grid(dataset.to_display(frames.flatten(0, 1)), columns)
            else:
                panels = [scatter_plot(frames[:, j], components.data.heldout, size=240)
                          for j in range(columns)]  # one panel per recorded step, left to right
                strip = Image.new("RGB", (240 * columns, 240), "white")
                for j, panel in enumerate(panels):
                    strip.paste(panel, (240 * j, 0))
            strip.save(out / "progressive.png")
            times = progressive.times
            info["progressive"] = shown
            if len(times) == len(frames_kept):
                info["progressive_times"] = [times[i] for i in every]
        else:
            notes.append(f"note: --progressive: {name} records neither x0_hat nor x while it "
                         "samples, so no progressive.png was written (solvers such as "
                         "ancestral, ddim or euler record x0_hat)")
    if args.interpolate:
        held = components.data.heldout
        pairs = min(args.pairs, len(held) // 2)
        device = diffusion.device
        seen = diffusion.model_data(components.data).heldout  # a latent model's latents
        with diffusion.sampling_weights() as model, torch.no_grad():
            ends = seen[: 2 * pairs].to(device, torch.float32)
            latents = encode(model, ends)
            reconstruction = decode(model, latents)
            info["reconstruction_max_abs_error"] = float((reconstruction - ends).abs().max())
            info["reconstruction_rms_error"] = float((reconstruction - ends).pow(2).mean().sqrt())
            weights = torch.linspace(0, 1, args.interpolate)
            path = slerp(latents[:pairs], latents[pairs:], weights)  # (P, K, ...)
            decoded = decode(model, path.flatten(0, 1))
            if diffusion.autoencoder is not None:
                decoded = latent.decode(diffusion.autoencoder, decoded)
            decoded = decoded.float().cpu()
        if image:
            strip = image_grid(dataset.to_display(decoded), args.interpolate)
            strip.save(out / "interpolation.png")
        else:
            scatter_plot(decoded, held).save(out / "interpolation.png")
        np.savez_compressed(out / "interpolation.npz", latents=path.cpu().numpy(),
                            decoded=decoded.numpy())
    write_json(out / "sampling.json", info)
    console = make_console()
    console.print(f"{n} samples with [bold]{name}[/]: {result.nfe} network evaluations, "
                  f"{seconds:.1f} s", soft_wrap=True)
    if "reconstruction_max_abs_error" in info:
        console.print(f"encode -> decode: max abs error "
                      f"{info['reconstruction_max_abs_error']:.2e}", soft_wrap=True)
    for note in notes:
        make_console(stderr=True).print(note, soft_wrap=True, markup=False)
    console.print(f"results in [bold]{escape(str(out))}[/]", soft_wrap=True)
    return 0


def _evenly(count: int, most: int) -> list[int]:
    """At most ``most`` indices of ``range(count)``, evenly spaced, the first and last kept."""
    if count <= most:
        return list(range(count))
    return sorted({round(k * (count - 1) / (most - 1)) for k in range(most)})

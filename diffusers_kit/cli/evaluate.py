"""``dkit evaluate RUN_DIR [--metrics ...]``: recompute metrics on a finished run's saved samples.

Nothing is sampled again: the samples are the run's ``samples.npz`` (or ``--samples FILE``, e.g.
one written by ``dkit sample`` under ``RUN_DIR/sampling/``). ``--metrics`` chooses metrics by
name (``fd``: the run's own settings for it when its spec has one, the defaults otherwise) or as
YAML mappings (``"{kind: fd, features: features_digits.yaml, resamples: 500}"``); without it,
the run's own metrics are recomputed. A model a metric refers to (the feature network) is built
or reused as in ``dkit run``. A finished run's own files are never changed: the figures go to a
new ``RUN_DIR/evaluation/<stamp>/metrics.json`` (or ``--out DIR``), except for samples that
``dkit sample`` wrote inside the run, whose ``metrics.json`` beside them gets them; they are
printed: value, interval, floor.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from rich.text import Text

from diffusers_kit.arrays import ArrayFile
from diffusers_kit.console import make_console
from diffusers_kit.metrics.floor import summarize
from diffusers_kit.registry import get_registry
from diffusers_kit.run import (
    BuildSettings,
    build_components,
    build_references,
    evaluate_metrics,
    load_previous,
)
from diffusers_kit.run.build import run_document
from diffusers_kit.run.stages import NonFiniteResult, non_finite_metrics
from diffusers_kit.run_folder import (
    METRICS,
    SAMPLES,
    finite,
    unique_folder,
    write_json,
)
from diffusers_kit.spec.errors import command_line_error
from diffusers_kit.spec.loader import apply_overrides, component_option
from diffusers_kit.spec.validate import validate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="recompute metrics on a finished run's "
                                                    "samples, without sampling again")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (or its "
                                                           "'latest')")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC",
                        help="metric names or YAML mappings, e.g. fd kid "
                             "'{kind: prdc, features: features_digits.yaml}' (default: the "
                             "run's own)")
    parser.add_argument("--samples", metavar="FILE", help="an .npz with a 'samples' array "
                        "(default: RUN_DIR/samples.npz)")
    parser.add_argument("--out", metavar="DIR", help="where metrics.json goes for the run's own "
                        "samples or samples outside RUN_DIR (default: a new "
                        "RUN_DIR/evaluation/<stamp>/)")
    parser.add_argument("--quiet", action="store_true", help="print no table")
    parser.set_defaults(func=evaluate_command)


def metric_configs(chosen: list[str], own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``--metrics`` items as metric mappings: a name takes the run's own settings for that
    kind when its spec has them; a YAML mapping is used as written."""
    def named(kind: str) -> dict[str, Any]:
        return next((dict(m) for m in own if m.get("kind") == kind), {"kind": kind})

    return [component_option("--metrics", text, "metric names or YAML mappings such as "
                             "'{kind: fd, features: features_digits.yaml}'", named)
            for text in chosen]


def load_samples(path: Path) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(samples, labels)`` of an .npz written by a run or ``dkit sample`` (labels: the
    requested class of each sample, when the samples are class-conditional)."""
    try:
        with ArrayFile(path) as file:  # the one array reader: refuses damaged, empty, NaN
            if "samples" not in file.names:
                raise command_line_error("--samples", f"an .npz holding a 'samples' array "
                                         f"({path} holds {', '.join(file.names) or 'no arrays'})",
                                         str(path))
            samples = torch.from_numpy(np.asarray(file.array("samples"), dtype=np.float32))
            labels = torch.from_numpy(np.asarray(file.array("labels"))).long() if (
                "labels" in file.names) else None
    except (OSError, ValueError) as exc:
        raise command_line_error("--samples", f"a usable .npz file of samples ({exc})",
                                 str(path)) from None
    return samples, labels


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (symbolic links followed)."""
    return path.resolve().is_relative_to(folder.resolve())


def evaluate_command(args: argparse.Namespace) -> int:
    err = make_console(stderr=True)
    folder, document = run_document(args.run_dir)
    samples_path = Path(args.samples).expanduser() if args.samples else folder / SAMPLES
    if args.metrics:
        section = document.data.get("evaluate")
        own = section.get("metrics") if isinstance(section, dict) else None
        configs = metric_configs(args.metrics, own if isinstance(own, list) else [])
        apply_overrides(document, [f"evaluate.metrics={json.dumps(configs)}"])
    registry = get_registry()
    spec = validate(document, registry)
    build_references(spec, registry, BuildSettings(Path(spec.output.root), console=err,
                                                   quiet=args.quiet))
    components = build_components(spec, document, registry, stages={"evaluate"})
    load_previous(components.diffusion, folder, "RUN_DIR")
    samples = labels = None
    if samples_path.is_file():
        samples, labels = load_samples(samples_path)
    elif args.samples or any(m.needs_samples for _, m in components.metrics):
        raise command_line_error("--samples" if args.samples else "RUN_DIR",
                                 "samples to evaluate (this run folder has no samples.npz; a "
                                 "spec that only trains has only metrics that need none)",
                                 str(samples_path))
    if samples is not None and tuple(samples.shape[1:]) != components.data.shape:
        raise command_line_error("--samples", f"samples of shape {components.data.shape}",
                                 f"{samples_path} with shape {tuple(samples.shape[1:])}")
    generator = torch.Generator().manual_seed(spec.seed)
    with components.diffusion.sampling_weights() as model:
        metrics = evaluate_metrics(components.metrics, samples, components.data, generator,
                                   model, labels,
                                   model_data=components.diffusion.model_data(components.data))
    figures = finite(metrics)  # NaN / infinity as null, as the run's report stage writes them
    own = samples is None or samples_path.resolve() == (folder / SAMPLES).resolve()
    if not own and _inside(samples_path, folder):  # dkit sample's output inside the run
        target = samples_path.parent / METRICS
    else:  # the finished run's own files are never changed; another run's file never beside
        out = (Path(args.out).expanduser() if args.out else
               unique_folder(folder / "evaluation", datetime.now().strftime("%Y%m%d-%H%M%S")))
        out.mkdir(parents=True, exist_ok=True)
        target = out / METRICS
        if samples is not None:
            figures["samples"] = str(samples_path.resolve())
    previous: dict[str, Any] = {}
    if target.is_file():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
    previous = previous if isinstance(previous, dict) else {}
    if samples is not None:
        previous.pop("out_of_range", None)  # recomputed: absent now means none are
    write_json(target, {**previous, **figures})
    bad = non_finite_metrics(metrics)
    if bad:  # written (as null), then the command fails
        raise NonFiniteResult(f"dkit evaluate gave NaN or infinite values for {', '.join(bad)} "
                              f"({target} holds them as null)")
    if not args.quiet:
        table = Table(title=f"dkit evaluate {folder}", header_style="bold")
        table.add_column("metric")
        table.add_column(Text("value [interval]  floor [interval]  n"), justify="right")
        for key, text in summarize(metrics):
            table.add_row(key, Text(text))
        make_console().print(table)
        err.print(f"metrics written to {target}", soft_wrap=True)
    return 0

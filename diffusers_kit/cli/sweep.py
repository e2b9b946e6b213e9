"""``dkit sweep RUN_DIR FIELD=V1,V2,... [overrides]``: a metric against a sampler setting.

For each value of the swept field (any dotted spec field: ``sample.solver.steps=5,10,20``,
``sample.guidance.0.scale=0,1,3,8`` - a number is a list index - or a whole value,
``"sample.solver={kind: ddim, steps: 10},{kind: dpm_solver_2m, steps: 10}"``; values are split
at the commas outside brackets, braces and quotes), the finished run is reloaded with that
override, samples are drawn exactly as ``dkit sample`` draws them (same seed for every value,
so sample ``i`` starts from the same noise) and the run's own metrics (or ``--metrics``, as in
``dkit evaluate``) are computed on them. Everything goes to ``RUN_DIR/sweeps/<field>-<stamp>/``:
``sweep.json`` (per value: metrics, NFE, seconds), ``sweep.png`` (the first metric on the left
axis, the second on the right; ``--plot`` chooses), ``samples_<value>.png`` / ``.npz``; the
best value by one metric (``--best``; default the first plotted) is printed and recorded as
``best``. Sweeping ``sample.ema_sigma_rel`` of a run trained with ``train.post_hoc_ema`` picks
the EMA length after training (post-hoc EMA, Karras et al. 2024).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from diffusers_kit.cli.evaluate import metric_configs
from diffusers_kit.cli.main import seed_option
from diffusers_kit.cli.sample import draw_samples, load_run
from diffusers_kit.console import make_console
from diffusers_kit.diffusion import batch_count
from diffusers_kit.metrics.floor import SUFFIXES
from diffusers_kit.registry import get_registry
from diffusers_kit.report import Series, metric_plot
from diffusers_kit.run import BuildSettings, build_references, evaluate_metrics
from diffusers_kit.run.build import refuse_model_changes, run_document
from diffusers_kit.run_folder import (
    SPEC_FILE,
    finite,
    unique_folder,
    write_json,
)
from diffusers_kit.spec.errors import command_line_error
from diffusers_kit.spec.loader import apply_overrides, load_file
from diffusers_kit.spec.validate import validate

# metrics whose values lie in a known range (the plot's axis stops there)
BOUNDED = {"class_accuracy": (0.0, 1.0), "accuracy": (0.0, 1.0), "precision": (0.0, 1.0),
           "recall": (0.0, 1.0), "coverage": (0.0, 1.0), "class_tv": (0.0, 1.0),
           "ssim": (-1.0, 1.0)}
# metrics for which more is better (every other statistic is a distance or an error: less is)
HIGHER_IS_BETTER = {"class_accuracy", "accuracy", "precision", "recall", "density", "coverage",
                    "clip_score", "psnr", "ssim"}
# fields that do not change how samples are drawn from the trained weights
NO_EFFECT = ("train", "output")


#: the most values one sweep takes unless --max-values says more: each value is a sampling and
#: an evaluation, and every value is validated before the first is drawn
MAX_VALUES = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="sample a trained run at several settings of "
                                                 "one field and plot a metric against it")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (or its "
                                                           "'latest')")
    parser.add_argument("sweep", metavar="FIELD=V1,V2,...",
                        help="the swept field and its values, e.g. sample.solver.steps=5,10,20 "
                             "or sample.guidance.0.scale=0,1,3 (commas inside [], {} or quotes "
                             "do not split)")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value",
                        help="more overrides of the run's spec, the same for every value")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC",
                        help="metric names or YAML mappings, as in dkit evaluate (default: the "
                             "run's own)")
    parser.add_argument("--plot", metavar="NAME[,NAME]",
                        help="the metrics to plot: the first on the left axis, the second on "
                             "the right (default: the first two)")
    parser.add_argument("--best", metavar="[min:|max:]NAME",
                        help="the metric that picks the best value (default: the first "
                             "plotted; lowest is best, highest for accuracies and precision / "
                             "recall, or as the min: / max: prefix says)")
    parser.add_argument("--n", type=int, help="samples per value (default: the spec's)")
    parser.add_argument("--seed", type=seed_option, help="sampling seed (default: the spec's)")
    parser.add_argument("--max-values", type=int, default=MAX_VALUES, metavar="N",
                        help=f"the most values one sweep takes (default {MAX_VALUES}: each "
                             "value is one sampling and one evaluation)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=sweep_command)


def split_values(text: str) -> list[str]:
    """``"2,4,{kind: ddim, steps: 5}"`` -> ``["2", "4", "{kind: ddim, steps: 5}"]``: commas
    inside brackets, braces, parentheses or quotes do not split."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``FIELD=V1,V2,...`` -> ``(field, [values])``; a malformed one is a spec error."""
    field, sep, raw = text.partition("=")
    field = field.strip()
    parts = field.split(".") if field else []
    path = tuple(int(p) if p.isdigit() else p for p in parts if p) or ("FIELD=V1,V2,...",)
    if not sep or not parts or any(not p for p in parts) or field.startswith("-"):
        raise command_line_error(path, "the swept field and its values, FIELD=V1,V2,... (e.g. "
                                 "sample.solver.steps=5,10,20)", text)
    values = split_values(raw)
    if any(not v for v in values):
        raise command_line_error(path, "values separated by commas, none empty (e.g. 5,10,20)",
                                 raw)
    if len(set(values)) != len(values):
        raise command_line_error(path, "distinct values", raw)
    return field, values


def file_stems(values: list[str]) -> list[str]:
    """A file-name-safe, distinct stem per value (``{kind: ddim}`` -> ``kind_ddim``)."""
    stems: list[str] = []
    for value in values:
        stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_.")[:40] or "value"
        while stem in stems:
            stem += "_"
        stems.append(stem)
    return stems


def short(text: str, limit: int = 16) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parsed(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def setting_labels(values: list[str]) -> list[str]:
    """Short labels for the plot's settings: mappings by what differs between them (the
    kind's name, then ``key=value``), anything else as written, shortened."""
    parsed = [_parsed(v) for v in values]
    if len(parsed) > 1 and all(isinstance(p, dict) for p in parsed):
        keys = list(dict.fromkeys(k for p in parsed for k in p))
        differing = [k for k in keys if any(p.get(k) != parsed[0].get(k) for p in parsed)]
        labels = []
        for p in parsed:
            words = [str(p[k]) if k == "kind" else f"{k}={p[k]}" for k in differing if k in p]
            labels.append(short(" ".join(words) or "{}", 24))
        if len(set(labels)) == len(labels):
            return labels
    return [short(v, 24) for v in values]


def metric_names(metrics: dict[str, Any]) -> list[str]:
    """The statistics of a metrics dict (their companions ``_low``, ``_floor``... and the
    per-class rows ``name_3`` left out), in order."""
    names = [k for k in metrics
             if not any(k.endswith(s) and k[: -len(s)] in metrics for s in SUFFIXES)]
    return [k for k in names if not (k.rpartition("_")[2].isdigit()
                                     and k.rpartition("_")[0] in names)]


def _number(value: Any, digits: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{digits}}" if isinstance(value, (int, float)) else str(value)


def _with_interval(metrics: dict[str, Any], key: str, separator: str = " ") -> str:
    """``value [low, high]`` (the interval left out when there is none)."""
    text = _number(metrics.get(key))
    if metrics.get(f"{key}_low") is not None and metrics.get(f"{key}_high") is not None:
        text += (f"{separator}[{_number(metrics[f'{key}_low'], '.3g')}, "
                 f"{_number(metrics[f'{key}_high'], '.3g')}]")
    return text


def parse_best(text: str | None) -> tuple[str | None, str | None]:
    """``--best``: ``(name, "min" | "max" | None)`` (None: the default direction)."""
    if text is None:
        return None, None
    direction, sep, name = text.strip().partition(":")
    if not sep:
        return direction, None
    if direction not in ("min", "max") or not name:
        raise command_line_error("--best", "a metric name, or min:NAME / max:NAME", text)
    return name, direction


def best_point(points: list[dict[str, Any]], name: str, direction: str | None
               ) -> tuple[int | None, str]:
    """The index of the point whose metric ``name`` is best (lowest, or highest for
    :data:`HIGHER_IS_BETTER` or ``direction == "max"``; points without a finite value are
    skipped) and the direction used. None when no point has a value."""
    direction = direction or ("max" if name in HIGHER_IS_BETTER else "min")
    scored = [(p["metrics"].get(name), index) for index, p in enumerate(points)]
    scored = [(v, i) for v, i in scored if isinstance(v, (int, float)) and math.isfinite(v)]
    if not scored:
        return None, direction
    pick = min if direction == "min" else max
    return pick(scored)[1], direction


def sweep_command(args: argparse.Namespace) -> int:
    err = make_console(stderr=True)
    field, values = parse_sweep(args.sweep)
    if args.max_values < 1:
        raise command_line_error("--max-values", "a positive number", args.max_values)
    if len(values) > args.max_values:
        raise command_line_error(field, f"at most {args.max_values} values (each is one sampling "
                                 "and one evaluation; raise the limit with --max-values N)",
                                 f"{len(values)} values")
    if args.n is not None and args.n < 1:
        raise command_line_error("--n", "a positive number", args.n)
    best_name, best_direction = parse_best(args.best)
    plotted = [p.strip() for p in args.plot.split(",")] if args.plot else None
    if plotted is not None and (not all(plotted) or not 1 <= len(plotted) <= 2):
        raise command_line_error("--plot", "one or two metric names, e.g. fd,class_accuracy",
                                 args.plot)
    folder, _ = run_document(args.run_dir)

    overrides = list(args.overrides)
    refuse_model_changes([*overrides, args.sweep])  # the trained model stays what it is
    if args.n is not None:
        overrides.append(f"sample.n={args.n}")
    if args.metrics:
        section = load_file(folder / SPEC_FILE).data.get("evaluate")
        own = section.get("metrics") if isinstance(section, dict) else None
        configs = metric_configs(args.metrics, own if isinstance(own, list) else [])
        overrides.append(f"evaluate.metrics={json.dumps(configs)}")
    # every value checked before anything is drawn or written: a bad field or value is named
    registry = get_registry()
    for value in values:
        document = load_file(folder / SPEC_FILE)
        apply_overrides(document, [*overrides, f"{field}={value}"])
        spec = validate(document, registry)
        if spec.sample is None:
            raise command_line_error("RUN_DIR", "a run of a spec with a sample section (this one "
                                     "only trains)", args.run_dir)
        if not spec.evaluate.metrics:
            raise command_line_error("--metrics", "metrics to compute (the run's spec has none)",
                                     None)
    if field.split(".")[0] in NO_EFFECT:
        err.print(f"note: {field} does not change how samples are drawn from the trained "
                  "weights", soft_wrap=True, markup=False)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', field)}-{stamp}"
    stems = file_stems(values)
    points: list[dict[str, Any]] = []
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), console=err, disable=args.quiet, transient=False)
    out = unique_folder(folder / "sweeps", stem)  # atomic, unique; never through a link
    try:
        with progress:
            overall = progress.add_task("sweep", total=len(values), status=field)
            for index, (value, stem) in enumerate(zip(values, stems, strict=True)):
                progress.update(overall, status=f"{field}={short(value, 30)}: loading")
                spec, components = load_run(folder, [*overrides, f"{field}={value}"])
                build_references(spec, registry, BuildSettings(
                    Path(spec.output.root), console=err, quiet=args.quiet or index > 0))
                n = spec.sample.n
                seed = spec.seed if args.seed is None else args.seed
                batches = batch_count(n, spec.sample.batch_size,
                                      components.diffusion.network.data_shape)
                steps = components.solver.total_steps(components.diffusion.process)
                task = progress.add_task(f"  {short(value, 30)}", status="sampling",
                                         total=steps * batches)
                drawn = draw_samples(spec, components, out, n, seed, stem=f"samples_{stem}",
                                     progress=lambda k, task=task: progress.advance(task, k))
                progress.update(task, status="evaluating")
                metrics = _evaluate(spec, components, drawn.samples, drawn.result.labels)
                figures = finite(metrics)  # NaN / infinity as null, as in metrics.json
                points.append({"value": _parsed(value), "text": value, "metrics": figures,
                               "nfe": drawn.result.nfe, "seconds": round(drawn.seconds, 3),
                               "samples": f"samples_{stem}.png", "sampling": drawn.info})
                progress.update(task, status=f"{drawn.result.nfe} NFE, {drawn.seconds:.1f} s")
                progress.advance(overall)
                if index == 0:
                    names = metric_names(figures)
                    asked = [("--plot", n) for n in plotted or []]
                    asked += [("--best", best_name)] if best_name else []
                    for option, name in asked:
                        if name not in names:
                            raise command_line_error(
                                option, f"metrics of this sweep ({', '.join(names)})",
                                name, difflib.get_close_matches(name, names, 2))
            progress.update(overall, status=f"{field}: done")
    except BaseException:  # a mistake found on the way, an interrupt: no half-written sweep
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):  # RUN_DIR/sweeps too, when this made it
            out.parent.rmdir()  # only an empty folder is removed
        raise

    names = metric_names(points[0]["metrics"])
    shown = plotted or names[:2]
    chosen = best_name or shown[0]
    best, direction = best_point(points, chosen, best_direction)
    record = {"run": str(folder), "field": field, "values": values, "overrides": overrides,
              "seed": spec.seed if args.seed is None else args.seed, "plot": shown,
              "best": None if best is None else {
                  "metric": chosen, "direction": direction, "value": points[best]["value"],
                  "text": points[best]["text"], "figure": points[best]["metrics"][chosen]},
              "points": points}
    write_json(out / "sweep.json", record)

    series = []
    for name, axis in zip(shown, ("left", "right"), strict=False):
        rows = [p["metrics"] for p in points]
        floors = [m.get(f"{name}_floor") for m in rows]
        same = all(f == floors[0] for f in floors)
        series.append(Series(name, [m.get(name) for m in rows],
                             [m.get(f"{name}_low") for m in rows],
                             [m.get(f"{name}_high") for m in rows],
                             floors[0] if same else floors, axis=axis,
                             bounds=BOUNDED.get(name)))
    numeric = all(isinstance(_parsed(v), (int, float)) for v in values)
    picture = metric_plot(setting_labels(values), series,
                          f"{spec.name}: {' and '.join(shown)} vs {field}",
                          f"{field} (evenly spaced)" if numeric and len(values) > 2 else field)
    picture.save(out / "sweep.png")

    table = Table(title=Text(f"dkit sweep {folder}: value [interval] per setting of {field}"),
                  header_style="bold")
    table.add_column(Text(field))
    for name in names:
        table.add_column(Text(name), justify="right")
    table.add_column("nfe", justify="right")
    table.add_column("seconds", justify="right")
    for p in points:
        table.add_row(Text(p["text"]),
                      *(Text(_with_interval(p["metrics"], name, "\n")) for name in names),
                      str(p["nfe"]), f"{p['seconds']:.2f}")
    floors = [f"{name} {_with_interval(points[0]['metrics'], f'{name}_floor')}"
              for name in names if points[0]["metrics"].get(f"{name}_floor") is not None]
    if floors:
        table.caption = Text("floors (real data): " + "; ".join(floors))
    make_console().print(table)
    if best is not None:
        make_console().print(
            f"best by {chosen} ({'lowest' if direction == 'min' else 'highest'}): "
            f"{field}={points[best]['text']} ({_with_interval(points[best]['metrics'], chosen)})",
            soft_wrap=True, markup=False)
    err.print(f"results in {out}", soft_wrap=True, markup=False)
    return 0


def _evaluate(spec: Any, components: Any, samples: Any, labels: Any) -> dict[str, float]:
    """The metrics of ``components`` on ``samples``, as a run and ``dkit evaluate`` compute
    them (the spec's seed draws the real sets, so every value is compared with the same
    floor)."""
    import torch


    generator = torch.Generator().manual_seed(spec.seed)
    with components.diffusion.sampling_weights() as model:
        return evaluate_metrics(components.metrics, samples, components.data, generator, model,
                                labels,
                                model_data=components.diffusion.model_data(components.data))

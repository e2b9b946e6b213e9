"""``dkit runs [NAME]``: the runs under an output root; ``--compare A B ...``: side by side.

The table reads each run folder's ``run.json`` (status, step, training hash) and
``metrics.json``; a run whose record says ``running`` but whose process is gone is shown as
interrupted. ``--compare`` lists the metrics of several runs in columns, then every resolved
spec field in which they differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from diffusers_kit.console import make_console
from diffusers_kit.run_folder import (
    SPEC_FILE,
    follow_latest,
    live_status,
    read_record,
    run_folders,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue

STATUS_STYLE = {"finished": "green", "running": "cyan", "failed": "red",
                "interrupted": "yellow", "unknown": "dim"}
# shown first in the table when a run has them (ratios to the noise floor read best)
KEY_METRICS = ("swd_ratio", "fd", "kid", "precision", "recall", "class_accuracy", "accuracy",
               "nll_bpd", "psnr", "ssim")
HIDDEN = ("time_", "nfe", "train_hash", "checkpoint_from", "dependencies")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("runs", help="list runs (status, step, metrics); compare runs")
    parser.add_argument("name", nargs="?", help="only the runs of this spec name")
    parser.add_argument("--root", default="runs", help="the output root (default: runs)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="run folders (or NAME/latest) to compare side by side")
    parser.add_argument("--metrics", type=int, default=3, metavar="K",
                        help="metrics shown per run in the list (default 3)")
    parser.set_defaults(func=runs_command)


def _metrics(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(
        v, bool) and not k.startswith(HIDDEN)}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _key_metrics(metrics: dict[str, Any], count: int) -> str:
    keys = [k for k in KEY_METRICS if k in metrics]
    keys += [k for k in metrics if k not in keys and not k.endswith(
        ("_floor", "_low", "_high", "_n", "_se"))]
    return ", ".join(f"{k} {_number(metrics[k])}" for k in keys[:count])


def list_table(root: Path, name: str | None, count: int) -> Table:
    table = Table(title=f"runs under {root}" + (f" named {name}" if name else ""),
                  header_style="bold")
    for column, justify in (("name", "left"), ("run", "left"), ("status", "left"),
                            ("step", "right"), ("metrics", "left"), ("hash", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for folder in run_folders(root, name):
        record = read_record(folder)
        status = live_status(folder, record)
        style = STATUS_STYLE.get(status, "")
        record = record or {}
        how = ""
        if record.get("checkpoint_from"):
            how = " (reused)" if record.get("train_hash") else ""
        table.add_row(folder.parent.name, folder.name, f"[{style}]{status}[/]{how}",
                      _number(record.get("step")), _key_metrics(_metrics(folder), count),
                      str(record.get("train_hash") or "")[:12])
    return table


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(v, dict) for v in data):
        out = {}
        for index, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}[{index}]"))
        return out
    return {prefix: data}


def _run_folder(text: str) -> Path:
    folder = follow_latest(Path(text).expanduser())
    if not (folder / SPEC_FILE).is_file():
        raise SpecError([SpecIssue(("--compare",), "run folders holding spec.yaml (relative to "
                                   f"the working directory {Path.cwd()})", text, None,
                                   "command line")])
    return folder


def compare_tables(folders: list[Path]) -> tuple[Table, Table]:
    labels = [f"{f.parent.name}/{f.name}" for f in folders]
    metrics = [_metrics(f) for f in folders]
    records = [read_record(f) or {} for f in folders]
    first = Table(title="metrics", header_style="bold")
    first.add_column("metric")
    for label in labels:
        first.add_column(label, justify="right")
    first.add_row("status", *(live_status(f, r or None) for f, r in zip(folders, records,
                                                                          strict=True)))
    first.add_row("step", *(_number(r.get("step")) for r in records))
    first.add_row("hash", *(str(r.get("train_hash") or "")[:12] for r in records))
    keys = [k for k in KEY_METRICS if any(k in m for m in metrics)]
    keys += sorted({k for m in metrics for k in m} - set(keys))
    for key in keys:
        first.add_row(key, *(_number(m.get(key)) for m in metrics))
    specs = []
    for folder in folders:
        try:
            specs.append(_flatten(yaml.safe_load((folder / SPEC_FILE).read_text("utf-8"))))
        except (OSError, yaml.YAMLError):
            specs.append({})
    second = Table(title="spec fields that differ", header_style="bold")
    second.add_column("field")
    for label in labels:
        second.add_column(label, justify="right")
    fields = sorted({k for s in specs for k in s})
    differing = [k for k in fields if len({json.dumps(s.get(k), sort_keys=True, default=str)
                                           for s in specs}) > 1]
    for key in differing:
        second.add_row(key, *(_number(s.get(key, "—")) for s in specs))
    if not differing:
        second.add_row("(none: the same resolved spec)", *("" for _ in folders))
    return first, second


def runs_command(args: argparse.Namespace) -> int:
    console = make_console()  # piped: COLUMNS or a wide default, not rich's 80
    if args.compare:
        folders = [_run_folder(text) for text in args.compare]
        for table in compare_tables(folders):
            console.print(table)
        return 0
    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise SpecError([SpecIssue(("--root",), "an existing output root (relative to the "
                                   f"working directory {Path.cwd()})", str(root), None,
                                   "command line")])
    if args.name and not (root / args.name).is_dir():
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not
                       p.name.startswith("."))
        raise SpecError([SpecIssue(("NAME",), f"a spec name with runs under {root}: "
                                   f"{', '.join(names) or 'none yet'}", args.name, None,
                                   "command line")])
    console.print(list_table(root, args.name, args.metrics))
    return 0

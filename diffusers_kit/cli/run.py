"""``dkit run SPEC [field.path=value ...]``: validate, build and execute a spec."""

from __future__ import annotations

import argparse

from rich.console import Console

from diffusers_kit.spec import load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run a spec: data -> train -> sample -> evaluate")
    parser.add_argument("spec", help="the YAML spec file")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value",
                        help="override spec fields, e.g. train.steps=100 device=cpu")
    parser.add_argument("--only", metavar="STAGES",
                        help="comma-separated stages to run (train,sample,evaluate); "
                             "data and report always run")
    parser.add_argument("--from", dest="from_dir", metavar="RUN_DIR",
                        help="take checkpoint.safetensors from this earlier run folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from diffusers_kit.graph import execute, summary_table
    from diffusers_kit.train import TrainingDiverged

    spec, document = load_spec(args.spec, args.overrides)
    console = Console(stderr=True)
    try:
        run = execute(spec, document, only=args.only, from_dir=args.from_dir, console=console,
                      quiet=args.quiet)
    except TrainingDiverged as exc:
        console.print(f"[bold red]training stopped:[/] {exc}; the last checkpoint is kept")
        return 1
    out = Console()
    out.print(summary_table(run))
    out.print(f"results in [bold]{run.dir}[/] (samples.png, metrics.json, checkpoint.safetensors)",
              soft_wrap=True)
    return 0

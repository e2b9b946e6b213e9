"""``dkit run SPEC [field.path=value ...]``: validate, build and execute a spec."""

from __future__ import annotations

import argparse

from rich.markup import escape

from diffusers_kit.console import make_console
from diffusers_kit.run import execute, summary_table
from diffusers_kit.spec import load_spec
from diffusers_kit.train import PeerLost, TrainingDiverged, TrainingInterrupted


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
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the interrupted run in RUN_DIR from its checkpoint; "
                             "for a finished run, train longer (train.steps raised, never "
                             "lowered) or evaluate again in a new run folder that records "
                             "where it came from (the finished run is not changed)")
    parser.add_argument("--rebuild", action="store_true",
                        help="train again even when a finished run (of this spec or of a model "
                             "it refers to) has the same training hash")
    parser.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                        help="only with --resume: let this spec field (or section) differ from "
                             "the run's, e.g. train.optimizer.lr after a NaN stop; repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    spec, document = load_spec(args.spec, args.overrides)
    console = make_console(stderr=True)
    try:
        run = execute(spec, document, only=args.only, from_dir=args.from_dir,
                      resume=args.resume, console=console, quiet=args.quiet,
                      rebuild=args.rebuild, allow_change=tuple(args.allow_change))
    except TrainingDiverged as exc:
        console.print(f"[bold red]training stopped:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    except PeerLost as exc:
        console.print(f"[bold red]training stopped:[/] {escape(str(exc))}", soft_wrap=True)
        if exc.checkpoint and exc.run_dir is not None:
            console.print(f"Continue with [bold]torchrun ... dkit run {escape(args.spec)} --resume "
                          f"{escape(str(exc.run_dir))}[/] on as many processes as before",
                          soft_wrap=True)
        return 1
    except TrainingInterrupted as exc:
        where = "a checkpoint was written" if exc.saved else "no checkpoint was written"
        folder = escape(str(exc.run_dir)) if exc.run_dir else "RUN_DIR"
        console.print(f"[yellow]interrupted after step {exc.step}[/]; {where}. Continue with "
                      f"[bold]dkit run {escape(args.spec)} --resume {folder}[/]", soft_wrap=True)
        return 130
    if run.dir is None:  # a data-parallel rank other than 0
        return 0
    out = make_console()
    out.print(summary_table(run))
    written = [name for name in ("samples.png", "restore.png", "metrics.json",
                                 "checkpoint.safetensors") if (run.dir / name).exists()]
    out.print(f"results in [bold]{run.dir}[/] ({', '.join(written)})", soft_wrap=True)
    return 0

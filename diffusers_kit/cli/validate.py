"""``dkit validate SPEC``: check a spec (and overrides) without running anything.

Validation refuses what ``dkit run`` would refuse for a reason visible in the spec, before any
training: the spec's fields, every component built (the data set loaded for the network's
shape), every check between components, and every metric tried at the run's sizes.
"""

from __future__ import annotations

import argparse

from diffusers_kit.console import make_console
from diffusers_kit.graph import build_components
from diffusers_kit.spec import load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check a spec without running it")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value")
    parser.add_argument("--build", action="store_true",
                        help="accepted for scripts written for dkit 0.2: validation now always "
                             "builds every component")
    parser.set_defaults(func=validate_command)


def validate_command(args: argparse.Namespace) -> int:
    spec, document = load_spec(args.spec, args.overrides)
    build_components(spec, document, check_metrics=True)
    make_console().print(f"[green]ok[/] {args.spec}: spec {spec.name!r} is valid")
    return 0

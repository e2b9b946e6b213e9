"""``dkit validate SPEC``: check a spec (and overrides) without running anything."""

from __future__ import annotations

import argparse

from diffusers_kit.console import make_console
from diffusers_kit.spec import load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check a spec without running it")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*", metavar="field.path=value")
    parser.add_argument("--build", action="store_true",
                        help="also build every component (loads the data set)")
    parser.set_defaults(func=validate_command)


def validate_command(args: argparse.Namespace) -> int:
    from diffusers_kit.graph import build_components, check_construction

    spec, document = load_spec(args.spec, args.overrides)
    if args.build:
        build_components(spec, document)
    else:
        check_construction(spec, document)  # the components that need no data
    make_console().print(f"[green]ok[/] {args.spec}: spec {spec.name!r} is valid")
    return 0

"""``dkit schema``: the JSON Schema of spec files, for editors (yaml-language-server)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusers_kit.registry import get_registry
from diffusers_kit.spec.schema import spec_schema


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("schema", help="print the JSON Schema of spec files")
    parser.add_argument("-o", "--output", help="write to this file instead of standard output")
    parser.add_argument("--source", action="append", metavar="DISTRIBUTION",
                        help="only components from this distribution (repeatable), "
                             "e.g. --source diffusers_kit for the built-ins")
    parser.set_defaults(func=schema_command)


def schema_command(args: argparse.Namespace) -> int:
    sources = set(args.source) if args.source else None
    problems: list[str] = []
    text = json.dumps(spec_schema(get_registry(), sources, problems), indent=2) + "\n"
    for problem in problems:  # a plugin's unschemable annotation: named, the rest still served
        print(f"warning: {problem}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0

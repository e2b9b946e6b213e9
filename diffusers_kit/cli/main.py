"""``dkit``: argument parsing, error reporting (exit status 2 for user mistakes), dispatch.

Each subcommand is a module ``diffusers_kit.cli.<name>`` with ``register(subparsers)`` that adds
its parser and sets ``func`` (``args -> exit status``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console
from rich.markup import escape

from diffusers_kit.spec.errors import SpecError

COMMANDS = ("run", "validate", "schema", "plugins", "process", "sample", "likelihood")

USER_ERROR = 2


class UsageError(Exception):
    """A mistake on the command line (not in a spec)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors also exit 2, without noise
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dkit", description="Declarative diffusion and score-based models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"diffusers_kit.cli.{name}").register(subparsers)
    return parser


def print_spec_error(error: SpecError, console: Console) -> None:
    source = f" in {error.source}" if error.source else ""
    console.print(f"[bold red]error:[/] {len(error.issues)} problem(s){escape(source)}")
    for issue in error.issues:
        where = f"[cyan]{escape(issue.where)}[/] " if issue.where else ""
        text = (f"  {where}[bold]{escape(issue.field)}[/]: expected {escape(issue.expected)}; "
                f"given {escape(issue.given_text)}")
        if issue.suggestions:
            text += f" [green](did you mean {escape(' or '.join(map(repr, issue.suggestions)))}?)"
        console.print(text, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    err = Console(stderr=True)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides may also follow options: dkit run s.yaml --quiet a.b=1
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                  for e in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.version:
            from diffusers_kit import __version__

            print(f"dkit {__version__}")
            return 0
        if not getattr(args, "func", None):
            parser.print_help()
            return USER_ERROR
        return int(args.func(args) or 0)
    except SpecError as exc:
        print_spec_error(exc, err)
        return USER_ERROR
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return USER_ERROR
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())

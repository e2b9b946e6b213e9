"""``dkit plugins`` and ``dkit plugins show KIND NAME``."""

from __future__ import annotations

import argparse
import collections.abc
import types
import typing
from typing import Any

from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffusers_kit.console import make_console
from diffusers_kit.hookspecs import PLUGIN_API_VERSION
from diffusers_kit.registry import (
    SLOW_IMPORT_SECONDS,
    Component,
    Registry,
    RegistryError,
    get_registry,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list components, or show one's parameters")
    sub = parser.add_subparsers(dest="plugins_command", metavar="show")
    show = sub.add_parser("show", help="parameters of one component")
    show.add_argument("kind")
    show.add_argument("name")
    parser.add_argument("--kind", help="list only this kind")
    parser.set_defaults(func=plugins_command)


def _type_name(annotation: Any) -> str:
    """A readable type: ``one of 'a', 'b'`` for a Literal, ``X or none`` for an Optional,
    ``list of X``, and the class name otherwise (Annotated metadata is shown as constraints)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(names)
        return f"{text} or none" if type(None) in args else text
    if origin in (list, collections.abc.Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "(" + ", ".join(_type_name(a) for a in args if a is not Ellipsis) + ")"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def _bounds(items: list[Any]) -> list[str]:
    parts = []
    for item in items:
        inner = getattr(item, "metadata", None)
        if isinstance(inner, list):
            parts += _bounds(inner)
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return parts


def _constraints(info: Any) -> str:
    """Bounds from the field and from Annotated types inside it (an Optional's, a list's)."""
    parts = _bounds(list(info.metadata))

    def inner(annotation: Any) -> None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            parts.extend(_bounds(list(args[1:])))
            inner(args[0])
        elif origin in (typing.Union, types.UnionType):
            for arg in args:
                inner(arg)

    inner(info.annotation)
    return ", ".join(dict.fromkeys(parts))


def show_component(component: Component, console: Console) -> None:
    console.print(f"[bold]{component.kind}[/] [cyan]{component.name}[/]  from {component.source}")
    if component.doc:
        console.print(escape(component.doc), highlight=False)
    table = Table(show_header=True, header_style="bold")
    for column in ("parameter", "type", "default", "constraints"):
        table.add_column(column)
    for name, info in component.params.model_fields.items():
        if name in component.nested:
            nested = component.nested[name]
            kind = f"list of {nested.kind}" if nested.many else f"{nested.kind} component"
            table.add_row(name, kind, "required" if info.is_required() else "none", "")
            continue
        default = "required" if info.default is PydanticUndefined else repr(info.default)
        table.add_row(name, escape(_type_name(info.annotation)), escape(default),
                      _constraints(info))
    if component.context:
        table.caption = "set by the run graph: " + ", ".join(component.context)
    console.print(table)


def plugins_command(args: argparse.Namespace) -> int:
    registry = get_registry()
    console = make_console()
    if args.kind:  # an old kind name still works here, with a note
        command = "show" if args.plugins_command == "show" else "--kind"
        args.kind = registry.canonical_kind(args.kind, f"dkit plugins {command} {args.kind}")
    if args.plugins_command == "show":
        try:
            component = registry.get(args.kind, args.name)
        except RegistryError as exc:
            raise SpecError([SpecIssue((args.kind,), exc.expected, args.name, None,
                                       "command line", exc.suggestions)]) from None
        show_component(component, console)
        _print_deprecations(registry, console)
        return 0
    try:
        listed = registry.components(args.kind)
    except RegistryError as exc:
        raise SpecError([SpecIssue(("--kind",), exc.expected, args.kind, None, "command line",
                                   exc.suggestions)]) from None
    console.print(f"plugin API {PLUGIN_API_VERSION} (a plugin module declares "
                  f"DKIT_PLUGIN_API = \"{api_requirement()}\")", highlight=False, soft_wrap=True)
    table = Table(title="dkit components", header_style="bold")
    for column in ("kind", "name", "from", "description"):
        table.add_column(column)
    for component in listed:
        table.add_row(component.kind, component.name, component.source, escape(component.summary))
    console.print(table)
    if registry.plugin_import_seconds:  # installed plugins (entry points), the built-in aside
        plugins = Table(title="installed plugins", header_style="bold")
        for column in ("plugin (distribution:entry point)", "import", "status"):
            plugins.add_column(column)
        for label, seconds in registry.plugin_import_seconds.items():
            status = "failed to load" if label in registry.plugin_errors else "loaded"
            slow = seconds > SLOW_IMPORT_SECONDS
            plugins.add_row(escape(label), f"{'[yellow]' if slow else ''}{seconds:.2f} s"
                            f"{' (slow)[/]' if slow else ''}", status)
        console.print(plugins)
    for label, error in registry.plugin_errors.items():
        console.print(f"[bold red]plugin {escape(label)} failed to load:[/] {escape(error)}",
                      soft_wrap=True)
    _print_deprecations(registry, console)
    return 0


def _print_deprecations(registry: Registry, console: Console) -> None:
    for message in registry.deprecations:  # e.g. a plugin registering kind 'dataset'
        console.print(f"[yellow]deprecated:[/] {escape(message)}", soft_wrap=True)


def api_requirement() -> str:
    """The ``DKIT_PLUGIN_API`` specifier a plugin written today declares: this API version or a
    later minor one (``>=1.1,<2`` for API 1.1)."""
    major = int(PLUGIN_API_VERSION.split(".")[0])
    return f">={PLUGIN_API_VERSION},<{major + 1}"

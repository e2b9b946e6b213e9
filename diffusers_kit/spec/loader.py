"""Safe YAML loading that remembers the line of every value, and dotted command-line overrides."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import yaml

from diffusers_kit.spec.errors import Path, SpecError, SpecIssue

# A spec is a few hundred lines; these bounds are far above any real one and far below what
# exhausts memory or the interpreter's stack (PyYAML composes recursively).
MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 48
MAX_NODES = 200_000  # scalars, mappings and sequences, counting every alias expanded


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: ``1e-5`` is a number (YAML 1.1,
    which PyYAML follows, wants a dot, and would hand ``1e-5`` over as a string)."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


@dataclass
class Document:
    """Spec data plus where each value came from (file line or command-line override)."""

    data: dict[str, Any]
    origin: str
    lines: dict[Path, int] = field(default_factory=dict)
    overridden: dict[Path, str] = field(default_factory=dict)

    def locate(self, path: Path) -> tuple[int | None, str]:
        """The line and origin of ``path``; falls back to the nearest enclosing value."""
        # a field the command line created (an unknown override) is blamed on the command line,
        # not on the file line of the section that happens to enclose it
        for known, text in self.overridden.items():
            if known[: len(path)] == path and path not in self.lines:
                return None, f"command line '{text}'"
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            if prefix in self.overridden:
                return None, f"command line '{self.overridden[prefix]}'"
            if prefix in self.lines:
                return self.lines[prefix], self.origin
        return None, self.origin


def _record_lines(node: yaml.Node, path: Path, lines: dict[Path, int], issues: list[SpecIssue],
                  origin: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                issues.append(SpecIssue(path + (key,), "each key once", "a repeated key",
                                        key_node.start_mark.line + 1, origin))
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _record_lines(value_node, path + (key,), lines, issues, origin)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, path + (index,), lines, issues, origin)


def _limits_issue(expected: str, given: str, line: int | None, origin: str) -> SpecError:
    return SpecError([SpecIssue((), expected, given, line, origin)], origin)


def _check_structure(text: str, origin: str) -> None:
    """Refuse documents that are too big, too deep, or that expand through aliases (a "billion
    laughs" document) before anything recursive or quadratic walks them.

    Works on PyYAML's event stream, which the parser produces without recursion; an alias counts
    the size of the whole node it repeats, so the count is the size of the expanded document."""
    if len(text) > MAX_SPEC_BYTES:
        raise _limits_issue(f"a spec of at most {MAX_SPEC_BYTES} characters",
                            f"{len(text)} characters", None, origin)
    size_of_anchor: dict[str, int] = {}
    # one frame per open collection: [its anchor, the values inside it so far]
    stack: list[list[Any]] = []
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = stack.pop()
            if anchor is not None:
                size_of_anchor[anchor] = count
            if stack:
                stack[-1][1] += count
            continue
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise _limits_issue(f"values nested at most {MAX_DEPTH} levels deep",
                                    "deeper nesting", line, origin)
            stack.append([event.anchor, 1])
            total += 1
            continue
        if isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                size_of_anchor[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            # an alias to an anchor still open would be a recursive structure: refused too
            if event.anchor not in size_of_anchor:
                raise _limits_issue("aliases (*name) only to a complete earlier anchor (&name)",
                                    f"*{event.anchor}", line, origin)
            size = size_of_anchor[event.anchor]
        else:
            continue
        total += size
        if stack:
            stack[-1][1] += size
        if total > MAX_NODES:
            raise _limits_issue(f"a spec of at most {MAX_NODES} values, counting what aliases "
                                "(*name) repeat", "more (a document that repeats itself through "
                                "aliases?)", line, origin)


def parse_value(raw: str, origin: str) -> Any:
    """One YAML value (a command-line override or option), under the same limits as a file."""
    _check_structure(raw, origin)
    return yaml.load(raw, Loader=SpecLoader)


def parse_yaml(text: str, origin: str) -> Document:
    """Parse spec text with PyYAML's safe loader; malformed or unsafe YAML is a spec error."""
    try:
        _check_structure(text, origin)
        node = yaml.compose(text, Loader=SpecLoader)
        data = yaml.load(text, Loader=SpecLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if "constructor for the tag" in problem:
            expected = "plain YAML data (tags that build Python objects are refused)"
        else:
            expected = "well-formed YAML"
        line = mark.line + 1 if mark is not None else None
        raise SpecError([SpecIssue((), expected, problem, line, origin)], origin) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([SpecIssue((), "a mapping of spec sections", data, 1, origin)], origin)
    lines: dict[Path, int] = {}
    issues: list[SpecIssue] = []
    if node is not None:
        _record_lines(node, (), lines, issues, origin)
    if issues:
        raise SpecError(issues, origin)
    return Document(data, origin, lines)


def load_file(path: str | FilePath) -> Document:
    """Read a spec file; a missing or unreadable file is a spec error."""
    path = FilePath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue((), "an existing spec file", str(path), None, str(path))],
                        str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue((), "a readable UTF-8 spec file", str(exc), None, str(path))],
                        str(path)) from None
    return parse_yaml(text, str(path))


def component_option(flag: str, text: str, expected: str,
                     named: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A command-line option that names a component (``--solver``, ``--guidance``,
    ``--metrics``, ``--method``, ``--operator``): a registered name (``ddim``) or a YAML
    mapping (``'{kind: ddim, steps: 20}'``). ``named`` turns a bare name into its mapping
    (default ``{kind: name}``). Anything else is a spec error naming ``flag``, with
    ``expected`` as what was expected."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):
        value = named(value) if named is not None else {"kind": value}
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise SpecError([SpecIssue((flag,), expected, text, None, "command line")])
    return value


def _parse_key(part: str) -> str | int:
    return int(part) if part.isdigit() else part


def apply_overrides(document: Document, overrides: list[str]) -> Document:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/flow collections."""
    issues: list[SpecIssue] = []
    for text in overrides:
        origin = f"command line '{text}'"
        key, sep, raw = text.partition("=")
        key = key.strip()
        parts = key.split(".") if key else []
        if not sep or not parts or any(not p for p in parts):
            path = tuple(_parse_key(p) for p in parts if p)
            issues.append(SpecIssue(path, "an override of the form field.path=value", text,
                                    None, origin))
            continue
        try:
            value = parse_value(raw, origin) if raw.strip() else ""
        except SpecError as exc:
            issues.extend(exc.issues)
            continue
        except yaml.YAMLError as exc:
            issues.append(SpecIssue(tuple(parts), "a YAML value", f"{raw} ({exc})", None, origin))
            continue
        path = tuple(_parse_key(p) for p in parts)
        node: Any = document.data
        ok = True
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                issues.append(SpecIssue(path[: depth + 1], "a mapping or a valid list index",
                                        text, None, origin))
                ok = False
                break
        if not ok:
            continue
        last = path[-1]
        indexable = isinstance(node, list) and isinstance(last, int) and last < len(node)
        if isinstance(node, dict) or indexable:
            node[last] = value
        else:
            issues.append(SpecIssue(path, "a mapping or a valid list index", text, None, origin))
            continue
        # the value (and everything below it) now comes from the command line
        for known in [p for p in document.lines if p[: len(path)] == path]:
            del document.lines[known]
        document.overridden[path] = text
    if issues:
        raise SpecError(issues, document.origin)
    return document

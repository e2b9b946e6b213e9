"""Safe YAML loading that remembers the line of every value, and dotted command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import yaml

from diffusers_kit.spec.errors import Path, SpecError, SpecIssue


@dataclass
class Document:
    """Spec data plus where each value came from (file line or command-line override)."""

    data: dict[str, Any]
    origin: str
    lines: dict[Path, int] = field(default_factory=dict)
    overridden: dict[Path, str] = field(default_factory=dict)

    def locate(self, path: Path) -> tuple[int | None, str]:
        """The line and origin of ``path``; falls back to the nearest enclosing value."""
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


def parse_yaml(text: str, origin: str) -> Document:
    """Parse spec text with PyYAML's safe loader; malformed or unsafe YAML is a spec error."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
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
            value = yaml.safe_load(raw) if raw.strip() else ""
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

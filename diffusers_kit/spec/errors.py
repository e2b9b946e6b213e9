"""Spec errors: all problems at once, each with field path, YAML line, expectation and input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]


def dotted(path: Path) -> str:
    """``("sample", "solver", "kind")`` -> ``"sample.solver.kind"`` (list items as ``[i]``)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<spec>"


def shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MISSING = object()


@dataclass
class SpecIssue:
    """One problem in a spec."""

    path: Path
    expected: str
    given: Any = _MISSING
    line: int | None = None
    origin: str | None = None  # a file name or "command line"
    suggestions: list[str] = field(default_factory=list)

    @property
    def field(self) -> str:
        return dotted(self.path)

    @property
    def given_text(self) -> str:
        return "nothing (missing)" if self.given is _MISSING else shorten(self.given)

    @property
    def where(self) -> str:
        if self.origin and self.line is not None:
            return f"{self.origin}:{self.line}"
        if self.line is not None:
            return f"line {self.line}"
        return self.origin or ""

    def describe(self) -> str:
        text = f"{self.where}: {self.field}: expected {self.expected}, given {self.given_text}"
        if self.suggestions:
            text += f" (did you mean {' or '.join(repr(s) for s in self.suggestions)}?)"
        return text


class SpecError(Exception):
    """A spec that cannot be run; carries every issue found."""

    exit_code = 2

    def __init__(self, issues: list[SpecIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        head = f"{len(self.issues)} problem(s) in spec" + (f" {self.source}" if self.source else "")
        return "\n".join([head, *("  " + issue.describe() for issue in self.issues)])


def command_line_error(option: str | Path, expected: str, given: Any,
                       suggestions: list[str] | None = None) -> SpecError:
    """A mistake in a command's option (``--n``, ``RUN_DIR``, or a spec field path a command
    names, as ``dkit sweep`` does): one issue, exit status 2."""
    path = option if isinstance(option, tuple) else (option,)
    return SpecError([SpecIssue(path, expected, given, None, "command line",
                                suggestions or [])])


def missing() -> Any:
    """The sentinel used for "no value was given"."""
    return _MISSING

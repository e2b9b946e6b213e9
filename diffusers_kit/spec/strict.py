"""Strict values for component parameters, whatever plugin declared them.

A component's parameters are validated by the pydantic model derived from its signature, in
pydantic's lax mode: ``steps: true`` would become 1, ``lr: "1e-3"`` a float, ``sigma_max: .inf``
would pass ``gt=0``. A spec is data a person typed, so here a number must be a number, a flag
true or false, a float finite, and an integer small enough for torch (int64) unless the
parameter's own ``Field`` says otherwise (``Field(strict=False)`` / ``Field(allow_inf_nan=True)``
opt out). Issues are reported only for values pydantic accepted, so nothing is reported twice.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

import pydantic
from pydantic.fields import FieldInfo

from diffusers_kit.spec.errors import Path, SpecIssue
from diffusers_kit.spec.loader import Document

INT64_MAX = 2**63 - 1


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, ...] | None`` -> (T, the Annotated metadata)."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            args = typing.get_args(annotation)
            annotation, metadata = args[0], [*metadata, *args[1:]]
        elif origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(inner) != 1:
                return annotation, metadata
            annotation = inner[0]
        else:
            return annotation, metadata


def _flags(metadata: list[Any]) -> tuple[bool, bool, bool]:
    """(lax allowed, non-finite allowed, has an upper bound) from Field metadata."""
    lax = any(getattr(m, "strict", None) is False for m in metadata)
    infinite = any(getattr(m, "allow_inf_nan", None) is True for m in metadata)
    bounded = False
    for item in metadata:
        parts = item.metadata if isinstance(item, FieldInfo) else [item]
        bounded |= any(getattr(p, "le", None) is not None or getattr(p, "lt", None) is not None
                       for p in parts)
    return lax, infinite, bounded


def _value_problem(kind: Any, metadata: list[Any], value: Any) -> str | None:
    lax, infinite, bounded = _flags(metadata)
    if lax:
        return None
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer (not true/false or a quoted string)"
        if not bounded and abs(value) > INT64_MAX:
            return f"an integer of at most {INT64_MAX} in size"
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number (not true/false or a quoted string)"
        if not infinite and isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
        return None
    return None


def _problems(annotation: Any, metadata: list[Any], value: Any, path: Path
              ) -> list[tuple[Path, str]]:
    kind, inner_metadata = _unwrap(annotation)
    metadata = [*metadata, *inner_metadata]
    if value is None:
        return []
    origin = typing.get_origin(kind)
    if origin in (list, tuple, typing.Sequence) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if not args:
            return []
        found = []
        for index, item in enumerate(value):
            element = args[index] if origin is tuple and len(args) > 1 and index < len(args) \
                else args[0]
            found += _problems(element, [], item, path + (index,))
        return found
    problem = _value_problem(kind, metadata, value)
    return [(path, problem)] if problem else []


def strict_issues(model: type[pydantic.BaseModel], params: dict[str, Any], path: Path,
                  document: Document, already: list[SpecIssue]) -> list[SpecIssue]:
    """Issues for ``params`` (a component's parameters) that lax validation let through."""
    reported = {issue.path for issue in already}
    issues = []
    for name, info in model.model_fields.items():
        if name not in params:
            continue
        for where, expected in _problems(info.annotation, [info, *info.metadata],
                                         params[name], path + (name,)):
            if where in reported:
                if expected != "a finite number":
                    continue
                # "less than or equal to 1e6; given nan" misleads: say what is wrong instead
                already[:] = [issue for issue in already if issue.path != where]
            line, origin = document.locate(where)
            value: Any = params[name]
            for part in where[len(path) + 1:]:
                value = value[part]
            issues.append(SpecIssue(where, expected, value, line, origin))
    return issues

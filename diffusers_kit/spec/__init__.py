"""Spec files: safe YAML, pydantic models, overrides, errors with line numbers, JSON Schema."""

from __future__ import annotations

from pathlib import Path

from diffusers_kit.registry import Registry, get_registry
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document, apply_overrides, load_file, parse_yaml
from diffusers_kit.spec.models import Spec
from diffusers_kit.spec.schema import spec_schema
from diffusers_kit.spec.validate import validate


def load_spec(
    path: str | Path, overrides: list[str] | None = None, registry: Registry | None = None
) -> tuple[Spec, Document]:
    """Read, override and validate a spec file; raises :class:`SpecError` on any problem."""
    document = load_file(path)
    if overrides:
        apply_overrides(document, overrides)
    return validate(document, registry or get_registry()), document


__all__ = [
    "Document",
    "Spec",
    "SpecError",
    "SpecIssue",
    "apply_overrides",
    "load_file",
    "load_spec",
    "parse_yaml",
    "spec_schema",
    "validate",
]

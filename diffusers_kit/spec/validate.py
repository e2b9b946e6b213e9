"""Validate a spec document: top-level sections by pydantic, each component by its own signature.

All problems are collected and raised together as one :class:`SpecError`.
"""

from __future__ import annotations

import typing
from typing import Any

import pydantic

from diffusers_kit.registry import Registry, RegistryError, suggest
from diffusers_kit.spec.errors import Path, SpecError, SpecIssue, missing
from diffusers_kit.spec.loader import Document
from diffusers_kit.spec.models import Spec, field_info, section_model, walk_components
from diffusers_kit.spec.references import check_references
from diffusers_kit.spec.strict import strict_issues


def _clean_message(message: str) -> str:
    for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return message


def _known_fields(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section model that ``loc`` points into (for "did you mean")."""
    current: type[pydantic.BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        annotation, _ = field_info(current, str(part))
        current = section_model(annotation)
    return list(current.model_fields) if current else []


def _pydantic_issues(
    error: pydantic.ValidationError,
    document: Document,
    prefix: Path,
    fields_at: typing.Callable[[tuple[Any, ...]], list[str]],
) -> list[SpecIssue]:
    issues = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        path = prefix + loc
        line, origin = document.locate(path)
        kind = item["type"]
        if kind == "missing":
            issue = SpecIssue(path, "a value (this field is required)", missing(), line, origin)
        elif kind == "extra_forbidden":
            known = fields_at(loc[:-1])
            issue = SpecIssue(
                path,
                "one of the known fields: " + (", ".join(known) if known else "none"),
                f"unknown field {loc[-1]!r}",
                line,
                origin,
                suggest(str(loc[-1]), known),
            )
        else:
            issue = SpecIssue(path, _clean_message(item["msg"]), item.get("input"), line, origin)
        issues.append(issue)
    return issues


def validate_component(
    registry: Registry,
    kind: str,
    raw: Any,
    path: Path,
    document: Document,
    issues: list[SpecIssue],
) -> None:
    """Check one ``{kind: name, ...}`` mapping (and the components nested in it)."""
    line, origin = document.locate(path)
    if not isinstance(raw, dict):
        issues.append(SpecIssue(path, f"a mapping {{kind: <{kind} name>, ...}}", raw, line, origin))
        return
    try:
        table = registry.kind(kind).components
    except RegistryError as exc:
        issues.append(SpecIssue(path, str(exc), raw, line, origin))
        return
    names = sorted(table)
    name = raw.get("kind", missing())
    if not isinstance(name, str) or name not in table:
        kpath = path + ("kind",)
        kline, korigin = document.locate(kpath)
        hint = suggest(name, names) if isinstance(name, str) else []
        issues.append(SpecIssue(kpath, f"a registered {kind}: {', '.join(names)}", name,
                                kline, korigin, hint))
        return
    component = table[name]
    params = {k: v for k, v in raw.items() if k != "kind"}
    known = ["kind", *component.params.model_fields]
    try:
        component.params.model_validate(params)
    except pydantic.ValidationError as exc:
        issues.extend(_pydantic_issues(exc, document, path, lambda loc: known))
    issues.extend(strict_issues(component.params, params, path, document, issues))
    for pname, sub in component.nested.items():
        if pname not in params or params[pname] is None:
            continue
        value, ppath = params[pname], path + (pname,)
        if sub.many:
            if not isinstance(value, list):
                pline, porigin = document.locate(ppath)
                issues.append(SpecIssue(ppath, f"a list of {sub.kind} mappings", value,
                                        pline, porigin))
                continue
            for index, item in enumerate(value):
                validate_component(registry, sub.kind, item, ppath + (index,), document, issues)
        else:
            validate_component(registry, sub.kind, value, ppath, document, issues)


def _walk_sections(raw: Any, registry: Registry, document: Document,
                   issues: list[SpecIssue]) -> None:
    """Validate every component mapping of ``raw`` (a spec mapping) against its signature;
    a single component that is not a mapping has been reported by pydantic already."""
    for path, kind, value in walk_components(raw):
        if isinstance(path[-1], int) or isinstance(value, dict):
            validate_component(registry, kind, value, path, document, issues)


MODEL_SECTIONS = ("data", "process", "network", "objective")


def _model_sections(document: Document, spec: Spec) -> list[SpecIssue]:
    """Without ``model`` the model's sections are required; with it they come from the model.
    A spec that trains an ``autoencoder`` needs data only (its objective defaults to
    ``reconstruction``) and has no process or network."""
    issues = []

    def present(name: str) -> bool:
        return isinstance(document.data, dict) and document.data.get(name) is not None

    def refuse(name: str, expected: str) -> None:
        line, origin = document.locate((name,))
        issues.append(SpecIssue((name,), expected, document.data[name], line, origin))

    if spec.model is None and spec.autoencoder is not None:
        for name in ("process", "network", "latent", "sample", "restore"):
            if present(name):
                refuse(name, f"no {name!r} section: this spec trains an autoencoder "
                       "(a first stage; a latent diffusion spec names it under 'latent')")
        if spec.data is None:
            line, origin = document.locate(("data",))
            issues.append(SpecIssue(("data",), "a value (the images the autoencoder learns)",
                                    missing(), line, origin))
        return issues
    if spec.model is None:
        for name in MODEL_SECTIONS:
            if getattr(spec, name) is None:
                line, origin = document.locate((name,))
                issues.append(SpecIssue((name,), "a value (this section is required unless "
                                        "'model' names a trained model)", missing(), line,
                                        origin))
        return issues
    for name in (*MODEL_SECTIONS, "train", "autoencoder", "latent"):
        if present(name):
            refuse(name, f"no {name!r} section: 'model' names a trained model, which brings "
                   "its own")
    return issues


def _post_hoc_choice(document: Document, spec: Spec) -> list[SpecIssue]:
    """``sample.ema_sigma_rel`` reconstructs from the snapshots ``train.post_hoc_ema`` stores:
    a spec that trains without them has nothing to reconstruct from (a ``model`` reference is
    checked when its checkpoint is loaded)."""
    if spec.sample is None or spec.sample.ema_sigma_rel is None or spec.model is not None:
        return []
    if spec.train.post_hoc_ema is not None:
        return []
    path = ("sample", "ema_sigma_rel")
    line, origin = document.locate(path)
    return [SpecIssue(path, "no value unless train.post_hoc_ema stores power-EMA snapshots "
                      "to reconstruct it from (set train.post_hoc_ema: {sigma_rels: [0.05, "
                      "0.1], every: 100}, or leave ema_sigma_rel out)",
                      spec.sample.ema_sigma_rel, line, origin)]


def validate(document: Document, registry: Registry,
             _stack: tuple[tuple[str, ...], ...] = ()) -> Spec:
    """Validate ``document`` fully; raises :class:`SpecError` listing every problem.

    Model references (:mod:`diffusers_kit.spec.references`) are checked too: each referenced spec is
    validated (its problems reported with its own file and lines), reference cycles are errors.
    ``_stack`` is the chain of spec files being validated through references.
    """
    issues: list[SpecIssue] = []
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(document.data)
    except pydantic.ValidationError as exc:
        issues.extend(_pydantic_issues(exc, document, (), lambda loc: _known_fields(Spec, loc)))
    _walk_sections(document.data, registry, document, issues)
    if spec is not None and not issues:
        # defaults filled in by pydantic (e.g. train.optimizer) are checked the same way
        _walk_sections(spec.model_dump(), registry, document, issues)
    if spec is not None and not issues:
        issues.extend(_model_sections(document, spec))
    if spec is not None and not issues:
        issues.extend(_post_hoc_choice(document, spec))
    if spec is not None and not issues:
        issues.extend(check_references(spec, document, registry, _stack, validate))
    if issues:
        issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise SpecError(issues, document.origin)
    assert spec is not None
    return spec


def component_paths(spec: Spec) -> list[tuple[Path, str, dict[str, Any]]]:
    """Every top-level component of ``spec``: ``(path, kind, config)``."""
    return list(walk_components(spec))

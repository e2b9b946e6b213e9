"""Planning the model references of a spec: find them, validate what they name, hash.

A referenced spec is validated like any spec (its problems are reported with its own file and
line), resolved to its fully defaulted form and hashed together with the dkit version and the
versions of the distributions that provide its components (:func:`training_hash`). A run-folder
reference must hold a finished run. Nothing is built here: the run layer builds (or reuses)
what a planned reference names.

Spec paths in a reference are looked up next to the referencing spec first, then in the working
directory; run folders are relative to the working directory, like ``output.root``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from diffusers_kit.references import (
    SPEC_SUFFIXES,
    ModelRef,
    ModelReferenceError,
    TrainedModel,
    is_model_annotation,
)
from diffusers_kit.registry import BUILTIN_SOURCE, Registry, get_registry
from diffusers_kit.run_folder import (
    CHECKPOINT,
    LATEST,
    SPEC_FILE,
    follow_latest,
    newest_run,
    read_record,
)
from diffusers_kit.spec.errors import Path as SpecPath
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document, apply_overrides, load_file
from diffusers_kit.spec.models import Spec, field_info, section_model, walk_components
from diffusers_kit.version import __version__

# the sections that decide the trained weights; logging and checkpoint cadence do not
TRAINING_SECTIONS = ("seed", "data", "autoencoder", "latent", "process", "network", "objective",
                     "train")
NOT_HASHED = {("train", "log_every"), ("train", "checkpoint_every")}
#: fields added after runs were trained: left out of the hash while null (their default), so
#: those runs keep their hashes; set, they are hashed (a run with post-hoc EMA snapshots is not
#: the same as one without)
HASHED_WHEN_SET = {("train", "post_hoc_ema")}

#: ``validate(document, registry, _stack=...)``: spec validation, handed in by its caller so that
#: planning a referenced spec validates it the same way without importing the validator
Validator = Callable[..., Spec]


def reference_fields(data: dict[str, Any], registry: Registry
                     ) -> list[tuple[SpecPath, Any]]:
    """Every ``(path, value)`` of ``data`` (a spec mapping) that holds a model reference: the
    top-level ``model`` and every component parameter typed :class:`TrainedModel`, nested
    components included. Values that are None are left out."""
    found: list[tuple[SpecPath, Any]] = []

    def component(kind: str, config: Any, path: SpecPath) -> None:
        if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
            return
        try:
            entry = registry.get(kind, config["kind"])
        except LookupError:
            return
        for name, info in entry.params.model_fields.items():
            if config.get(name) is not None and is_model_annotation(info.annotation):
                found.append((path + (name,), config[name]))
        for name, sub in entry.nested.items():
            value = config.get(name)
            if sub.many and isinstance(value, list):
                for index, item in enumerate(value):
                    component(sub.kind, item, path + (name, index))
            elif value is not None:
                component(sub.kind, value, path + (name,))

    def section(model: Any, raw: Any, path: SpecPath) -> None:
        if not isinstance(raw, dict):
            return
        for name, info in model.model_fields.items():
            annotation, marker = field_info(model, name)
            value = raw.get(name)
            if value is None:
                continue
            if marker is not None:
                items = enumerate(value) if marker.many and isinstance(value, list) else None
                if items is not None:
                    for index, item in items:
                        component(marker.kind, item, path + (name, index))
                elif not marker.many:
                    component(marker.kind, value, path + (name,))
            elif (sub := section_model(annotation)) is not None:
                section(sub, value, path + (name,))
            elif is_model_annotation(info.annotation):
                found.append((path + (name,), value))

    section(Spec, data, ())
    return found


def get_path(data: Any, path: SpecPath) -> Any:
    for part in path:
        data = data[part]
    return data


def set_path(data: Any, path: SpecPath, value: Any) -> None:
    get_path(data, path[:-1])[path[-1]] = value


# -- planning: validate every referenced spec, detect cycles -------------------------------------
class PlanFailed(Exception):
    def __init__(self, message: str, issues: list[SpecIssue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.issues = issues or []


def _spec_candidates(text: str, base: Path) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_absolute():
        return [path]
    out = [base / path, Path.cwd() / path]
    return list(dict.fromkeys(p.resolve() for p in out))


def find_run_folder(text: str) -> Path:
    """A run folder named by a reference (``latest`` followed); ModelReferenceError if not
    usable."""
    folder = Path(text).expanduser()
    if folder.name == LATEST and not folder.exists() and folder.parent.is_dir():
        raise ModelReferenceError(f"no finished run of {folder.parent.name!r} yet "
                             f"({folder} does not exist)")
    folder = follow_latest(folder)
    if not folder.is_dir():
        raise ModelReferenceError(f"an existing run folder (relative to the working directory "
                             f"{Path.cwd()}); {folder} does not exist")
    missing = [name for name in (SPEC_FILE, CHECKPOINT) if not (folder / name).is_file()]
    if missing:
        raise ModelReferenceError(f"a run folder holding {' and '.join(missing)}; "
                                  f"{folder} has none" + "".join(
                                      f" (did you mean {hint!r}?)" for hint in newest_run(folder)))
    record = read_record(folder)
    if record is not None and record.get("status") != "finished":
        raise ModelReferenceError(f"a finished run; {folder} is {record.get('status')!r} (a failed "
                             "or interrupted run is never used)")
    return folder


def plan_reference(model: TrainedModel, base: Path, stack: tuple[tuple[str, ...], ...],
                   validate: Validator) -> None:
    """Validate what ``model`` refers to (recursively) and compute its hash; nothing is built.

    ``base`` is the referencing spec's folder; ``stack`` the chain of spec files being planned,
    for cycle detection; ``validate`` validates a referenced spec. Raises :class:`PlanFailed`.
    """
    ref = model.ref
    if ref.spec is not None and ref.run is None:
        candidates = _spec_candidates(ref.spec, base)
        source = next((p for p in candidates if p.is_file()), None)
        if source is None:
            tried = " or ".join(str(p) for p in candidates)
            raise PlanFailed(f"an existing spec file ({tried} does not exist)")
        key = (str(source), *sorted(ref.overrides))
        chain = [Path(k[0]).name for k in stack]
        if key in stack:
            raise PlanFailed("no reference cycle; the chain is "
                              + " -> ".join([*chain, source.name]))
        try:
            document = load_file(source)
            if ref.overrides:
                apply_overrides(document, list(ref.overrides))
            spec = validate(document, get_registry(), _stack=(*stack, key))
        except SpecError as exc:
            raise PlanFailed(f"a valid spec; {source} has {len(exc.issues)} problem(s)",
                              exc.issues) from None
        model.source, model.document, model.spec = source, document, spec
        model.hash = spec_hash(spec)
        return
    try:
        folder = find_run_folder(ref.run or "")
    except ModelReferenceError as exc:
        raise PlanFailed(str(exc)) from None
    try:
        document = load_file(folder / SPEC_FILE)
        spec = validate(document, get_registry(), _stack=stack)
    except SpecError as exc:
        raise PlanFailed(f"a run folder whose spec.yaml is valid; {folder} has "
                          f"{len(exc.issues)} problem(s)", exc.issues) from None
    record = read_record(folder) or {}
    recorded = record.get("train_hash") or spec_hash(spec)
    if ref.hash is not None and ref.hash != recorded:
        raise PlanFailed(f"the run with hash {ref.hash[:12]}; {folder} holds "
                          f"{recorded[:12]} (its model changed since it was referenced)")
    model.run_dir, model.document, model.spec, model.hash = folder, document, spec, recorded


def check_references(spec: Spec, document: Document, registry: Registry,
                     stack: tuple[tuple[str, ...], ...], validate: Validator
                     ) -> list[SpecIssue]:
    """Plan every reference of a validated ``spec``: the issues found (field, line, what)."""
    issues: list[SpecIssue] = []
    origin = Path(document.origin)
    base = origin.parent if origin.suffix in SPEC_SUFFIXES else Path.cwd()
    if not stack and origin.suffix in SPEC_SUFFIXES and origin.is_file():
        stack = ((str(origin.resolve()),),)  # the top spec is the first link of any cycle
    for path, value in reference_fields(spec_view(spec), registry):
        model = value if isinstance(value, TrainedModel) else TrainedModel(ModelRef.parse(value))
        if model.resolved:
            continue
        line, where = document.locate(path)
        try:
            plan_reference(model, base, stack, validate)
        except PlanFailed as exc:
            issues.append(SpecIssue(path, exc.message, model.ref.to_config(), line, where))
            issues.extend(exc.issues)
            continue
        set_model(spec, path, model)
    return issues


def spec_view(spec: Any) -> dict[str, Any]:
    """A validated spec as nested dicts that share the spec's own component mappings (so that
    a value set in the view is set in the spec)."""
    return {name: spec_view(value) if isinstance(value, BaseModel) else value
            for name, value in ((n, getattr(spec, n)) for n in type(spec).model_fields)}


def set_model(spec: Spec, path: SpecPath, model: TrainedModel) -> None:
    """Put the planned TrainedModel in place inside the validated spec."""
    target: Any = spec
    for part in path[:-1]:
        target = target[part] if isinstance(target, (dict, list)) else getattr(target, part)
    last = path[-1]
    if isinstance(target, (dict, list)):
        target[last] = model
    else:
        object.__setattr__(target, str(last), model)


def references(spec: Spec, registry: Registry) -> list[tuple[SpecPath, TrainedModel]]:
    """The planned references of a validated spec, in spec order."""
    return [(path, value) for path, value in reference_fields(spec_view(spec), registry)
            if isinstance(value, TrainedModel)]


# -- hashing ------------------------------------------------------------------------------------
def _versions(resolved: dict[str, Any], registry: Registry) -> dict[str, str]:
    sources: set[str] = set()

    def walk(kind: str, config: Any) -> None:
        if isinstance(config, dict) and isinstance(config.get("kind"), str):
            with contextlib.suppress(LookupError):
                entry = registry.get(kind, config["kind"])
                sources.add(entry.source)
                for name, sub in entry.nested.items():
                    value = config.get(name)
                    for item in (value if sub.many and isinstance(value, list) else [value]):
                        walk(sub.kind, item)

    for path, kind, config in walk_components(resolved):
        if path[0] in TRAINING_SECTIONS:
            walk(kind, config)
    versions = {}
    for source in sorted(sources):
        if source == BUILTIN_SOURCE:
            versions[source] = __version__
            continue
        try:
            versions[source] = importlib.metadata.version(source)
        except importlib.metadata.PackageNotFoundError:
            versions[source] = "unknown"
    return versions


def spec_hash(spec: Spec, resolved: dict[str, Any] | None = None) -> str:
    """The training hash of a validated spec (its references already planned); ``resolved``:
    the spec with its defaults filled in, when the caller has it already."""
    registry = get_registry()
    if spec.model is not None and isinstance(spec.model, TrainedModel):
        assert spec.model.hash is not None
        return spec.model.hash  # a spec that samples another's model trains nothing itself
    return training_hash(resolved or resolve_spec(spec, registry), registry)


def resolve_spec(spec: Spec, registry: Registry) -> dict[str, Any]:
    """``spec`` with every component's defaults filled in (what a run folder's spec.yaml holds)."""
    resolved = spec.model_dump()
    for path, kind, config in walk_components(spec):
        set_path(resolved, path, registry.resolve(kind, config))
    return resolved


def training_hash(resolved: dict[str, Any], registry: Registry) -> str:
    """sha256 of what decides the trained weights: the training sections of the resolved spec
    (every default filled in; each model reference replaced by that model's own hash), the dkit
    version and the versions of the distributions whose components it uses. The device, the
    logging and checkpoint cadence, the output location and the sampling and evaluation
    sections are left out: they do not change the weights."""
    sections = json.loads(json.dumps({k: resolved.get(k) for k in TRAINING_SECTIONS}))
    for path, value in reference_fields(sections, registry):
        ref = value if isinstance(value, TrainedModel) else None
        digest = ref.hash if ref is not None else _recorded_hash(value)
        set_path(sections, path, {"model": digest})
    for section, key in NOT_HASHED:
        (sections.get(section) or {}).pop(key, None)
    for section, key in HASHED_WHEN_SET:
        if (sections.get(section) or {}).get(key, 0) is None:
            sections[section].pop(key)
    payload = {"sections": sections, "versions": _versions(resolved, registry)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _recorded_hash(value: Any) -> str:
    with contextlib.suppress(ValueError):
        ref = ModelRef.parse(value)
        if ref.hash:
            return ref.hash
    return json.dumps(value, sort_keys=True, default=str)

"""Runs that compose: references to trained models, content-addressed reuse, run records.

A component that needs a model trained elsewhere (a classifier for guidance, the feature network
of a metric, an autoencoder, the model to sample from) types that constructor parameter as
:class:`TrainedModel`. In a spec the value is a reference, in one of these forms::

    features: runs/features_digits/latest                  # a run folder (or its ``latest``)
    features: specs/features_digits.yaml                   # a spec file, built when needed
    features: {spec: features_digits.yaml, overrides: {train.steps: 500}}
    features: {run: runs/features_digits/20261123-101500}

A referenced spec is validated like any spec (its problems are reported with its own file and
line), resolved to its fully defaulted form and hashed together with the dkit version and the
versions of the distributions that provide its components (:func:`training_hash`). A finished
run with that hash under the output root is reused; otherwise the spec's train stage runs first,
in its own run folder under the same output root. A lock file per hash makes two concurrent
``dkit run`` that need the same missing model train it once: the second waits, then reuses.

Each run folder holds ``run.json``: its status (``running``, ``finished``, ``failed``,
``interrupted``), its training hash, the step reached and the models it used; ``<root>/<name>/
latest`` points to the newest finished run (a symlink, or a one-line file where the OS has no
symlinks).

Spec paths in a reference are looked up next to the referencing spec first, then in the working
directory; run folders are relative to the working directory, like ``output.root``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

if TYPE_CHECKING:
    from rich.console import Console

    from diffusers_kit.api import Diffusion
    from diffusers_kit.data.base import DataSplits
    from diffusers_kit.networks.base import Network
    from diffusers_kit.registry import Registry
    from diffusers_kit.spec.errors import Path as SpecPath
    from diffusers_kit.spec.errors import SpecIssue
    from diffusers_kit.spec.loader import Document
    from diffusers_kit.spec.models import Spec

RUN_RECORD = "run.json"
ALIVE = ".alive"
LATEST = "latest"
CHECKPOINT = "checkpoint.safetensors"
SPEC_FILE = "spec.yaml"
SPEC_SUFFIXES = (".yaml", ".yml")
STATUSES = ("running", "finished", "failed", "interrupted")
# the sections that decide the trained weights; logging and checkpoint cadence do not
TRAINING_SECTIONS = ("seed", "data", "autoencoder", "latent", "process", "network", "objective",
                     "train")
NOT_HASHED = {("train", "log_every"), ("train", "checkpoint_every")}

REFERENCE_FORMS = ("a trained model: a run folder ('runs/NAME/latest'), a spec file "
                   "('specs/NAME.yaml') or a mapping {run: FOLDER} / {spec: FILE, overrides: "
                   "{field.path: value}}")


class ModelReferenceError(ValueError):
    """A reference that cannot be resolved (raised with a message naming what is wrong)."""


# -- what a spec says ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A reference as written: a run folder, or a spec file with dotted overrides.

    ``hash`` and ``run`` are filled in when a spec reference has been built: the resolved spec
    written into a dependent run folder records exactly which model it used.
    """

    spec: str | None = None
    run: str | None = None
    overrides: tuple[str, ...] = ()
    hash: str | None = None

    @classmethod
    def parse(cls, value: Any) -> ModelRef:
        """A reference from its YAML form (a string or a mapping); ValueError otherwise."""
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(REFERENCE_FORMS)
            if value.endswith(SPEC_SUFFIXES):
                return cls(spec=value)
            return cls(run=value)
        if not isinstance(value, dict):
            raise ValueError(REFERENCE_FORMS)
        unknown = set(value) - {"spec", "run", "overrides", "hash"}
        if unknown:
            raise ValueError(f"{REFERENCE_FORMS}; unknown key(s) {sorted(unknown)}")
        spec, run = value.get("spec"), value.get("run")
        if spec is None and run is None:
            raise ValueError(f"{REFERENCE_FORMS}; the mapping names neither spec nor run")
        for key, item in (("spec", spec), ("run", run), ("hash", value.get("hash"))):
            if item is not None and (not isinstance(item, str) or not item.strip()):
                raise ValueError(f"{REFERENCE_FORMS}; {key} must be a path string")
        if spec is not None and not spec.endswith(SPEC_SUFFIXES):
            raise ValueError(f"{REFERENCE_FORMS}; spec must name a .yaml file")
        overrides = _parse_overrides(value.get("overrides"))
        if overrides and spec is None:
            raise ValueError(f"{REFERENCE_FORMS}; overrides apply to a spec, not to a run folder")
        return cls(spec=spec, run=run, overrides=overrides, hash=value.get("hash"))

    def to_config(self) -> str | dict[str, Any]:
        """The YAML form (the short string form when nothing else is set)."""
        if self.spec is not None and self.run is None and not self.overrides and not self.hash:
            return self.spec
        if self.run is not None and self.spec is None and not self.hash:
            return self.run
        out: dict[str, Any] = {}
        if self.spec is not None:
            out["spec"] = self.spec
        if self.overrides:
            out["overrides"] = list(self.overrides)
        if self.run is not None:
            out["run"] = self.run
        if self.hash is not None:
            out["hash"] = self.hash
        return out

    def describe(self) -> str:
        if self.spec is not None:
            extra = f" with {' '.join(self.overrides)}" if self.overrides else ""
            return f"spec {self.spec}{extra}"
        return f"run {self.run}"


def _parse_overrides(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            text = json.dumps(item) if not isinstance(item, str) else item
            items.append(f"{key}={text}")
        return tuple(items)
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    raise ValueError(f"{REFERENCE_FORMS}; overrides must be a mapping {{field.path: value}} "
                     "or a list of 'field.path=value' strings")


# -- what a component receives -------------------------------------------------------------------
class TrainedModel:
    """A model trained by a run, handed to the component that named it in its spec.

    Built by the run graph from a :class:`ModelRef` (the dependency is trained first when no
    finished run has its hash), or in Python with :meth:`resolve` or :meth:`from_diffusion`.
    :meth:`diffusion` loads the whole model (process, network with its sampling weights),
    :meth:`network` just the network in eval mode, :meth:`data` the data set it was trained on.
    """

    def __init__(self, ref: ModelRef | str | dict[str, Any]) -> None:
        self.ref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
        self.run_dir: Path | None = None
        self.spec: Spec | None = None
        self.document: Document | None = None
        self.hash: str | None = self.ref.hash
        self.source: Path | None = None  # the spec file, for spec references
        self.reused: bool | None = None  # after building: was a finished run reused?
        self._diffusion: Diffusion | None = None
        self._data: DataSplits | None = None

    # pydantic: a constructor parameter typed TrainedModel takes the YAML forms above
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler
                                     ) -> core_schema.CoreSchema:
        def validate(value: Any) -> TrainedModel:
            if isinstance(value, TrainedModel):
                return value
            if isinstance(value, ModelRef):
                return cls(value)
            return cls(ModelRef.parse(value))

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: value.to_config()),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        path = {"type": "string", "minLength": 1}
        return {
            "description": REFERENCE_FORMS,
            "anyOf": [
                {**path, "description": "a run folder, or a spec file ending in .yaml"},
                {"type": "object", "additionalProperties": False, "required": ["run"],
                 "properties": {"run": path, "hash": path}},
                {"type": "object", "additionalProperties": False, "required": ["spec"],
                 "properties": {"spec": path, "run": path, "hash": path, "overrides": {
                     "anyOf": [{"type": "object"},
                               {"type": "array", "items": {"type": "string"}}]}}},
            ],
        }

    @classmethod
    def from_diffusion(cls, diffusion: Diffusion, data: DataSplits | None = None,
                       name: str = "in-memory") -> TrainedModel:
        """Wrap a model trained in this Python session (nothing is read from disk)."""
        model = cls(ModelRef(run=f"<{name}>"))
        model._diffusion, model._data = diffusion, data
        model.hash = f"memory-{id(diffusion):x}"
        return model

    @classmethod
    def resolve(cls, reference: str | Path | dict[str, Any] | ModelRef, *,
                root: str | Path = "runs", rebuild: bool = False, quiet: bool = True,
                console: Console | None = None) -> TrainedModel:
        """A reference resolved (and its spec trained, when no finished run matches)."""
        ref = reference if isinstance(reference, ModelRef) else ModelRef.parse(
            str(reference) if isinstance(reference, Path) else reference)
        model = cls(ref)
        try:
            plan_reference(model, base=Path.cwd(), stack=())
        except _PlanFailed as exc:
            raise ModelReferenceError(exc.message) from None
        build_reference(model, root=Path(root), rebuild=rebuild, console=console, quiet=quiet)
        return model

    def to_config(self) -> str | dict[str, Any]:
        """The reference as it is written into a dependent run's resolved spec.yaml: the run
        folder actually used and its hash, beside the spec that produced it."""
        run = str(self.run_dir) if self.run_dir is not None else self.ref.run
        return ModelRef(spec=self.ref.spec, run=run, overrides=self.ref.overrides,
                        hash=self.hash).to_config()

    @property
    def resolved(self) -> bool:
        return self._diffusion is not None or self.run_dir is not None

    def diffusion(self) -> Diffusion:
        """The trained model (process + network, EMA weights for sampling when there are some),
        on the device it was trained for, loaded once."""
        if self._diffusion is None:
            if self.run_dir is None:
                # a Python user handed an unresolved reference: resolve it the default way
                resolved = TrainedModel.resolve(self.ref)
                self.run_dir, self.spec, self.hash = resolved.run_dir, resolved.spec, resolved.hash
            from diffusers_kit.graph import open_run

            spec, components = open_run(self.run_dir)
            self.spec = self.spec or spec
            self._diffusion, self._data = components.diffusion, components.data
        return self._diffusion

    def network(self) -> Network:
        """The trained network with its sampling (EMA) weights, in eval mode."""
        diffusion = self.diffusion()
        network = diffusion.network
        if diffusion.ema is not None and not getattr(network, "_dkit_ema_loaded", False):
            network.load_state_dict(diffusion.ema.state_dict(network))
            network._dkit_ema_loaded = True  # type: ignore[attr-defined]
        return network.eval()

    def data(self) -> DataSplits:
        """The data splits the model was trained on."""
        if self._data is None:
            self.diffusion()
        assert self._data is not None, "an in-memory model wrapped without its data"
        return self._data

    def __repr__(self) -> str:
        where = f" at {self.run_dir}" if self.run_dir else ""
        return f"TrainedModel({self.ref.describe()}{where})"


# -- finding references in a spec ---------------------------------------------------------------
def is_model_annotation(annotation: Any) -> bool:
    """Whether a constructor parameter (or spec field) takes a :class:`TrainedModel`."""
    if annotation is TrainedModel:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return is_model_annotation(typing.get_args(annotation)[0])
    if origin is not None:
        return any(is_model_annotation(arg) for arg in typing.get_args(annotation)
                   if arg is not type(None))
    return False


def reference_fields(data: dict[str, Any], registry: Registry
                     ) -> list[tuple[SpecPath, Any]]:
    """Every ``(path, value)`` of ``data`` (a spec mapping) that holds a model reference: the
    top-level ``model`` and every component parameter typed :class:`TrainedModel`, nested
    components included. Values that are None are left out."""
    from diffusers_kit.spec.models import Spec
    from diffusers_kit.spec.validate import _field_info, _section_model

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
            annotation, marker = _field_info(model, name)
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
            elif (sub := _section_model(annotation)) is not None:
                section(sub, value, path + (name,))
            elif is_model_annotation(info.annotation):
                found.append((path + (name,), value))

    section(Spec, data, ())
    return found


def _get(data: Any, path: SpecPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _set(data: Any, path: SpecPath, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


# -- planning: validate every referenced spec, detect cycles -------------------------------------
class _PlanFailed(Exception):
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
                                  f"{folder} has none")
    record = read_record(folder)
    if record is not None and record.get("status") != "finished":
        raise ModelReferenceError(f"a finished run; {folder} is {record.get('status')!r} (a failed "
                             "or interrupted run is never used)")
    return folder


def plan_reference(model: TrainedModel, base: Path, stack: tuple[tuple[str, ...], ...]) -> None:
    """Validate what ``model`` refers to (recursively) and compute its hash; nothing is built.

    ``base`` is the referencing spec's folder; ``stack`` the chain of spec files being planned,
    for cycle detection. Raises :class:`_PlanFailed`.
    """
    from diffusers_kit.registry import get_registry
    from diffusers_kit.spec.errors import SpecError
    from diffusers_kit.spec.loader import apply_overrides, load_file
    from diffusers_kit.spec.validate import validate

    ref = model.ref
    if ref.spec is not None and ref.run is None:
        candidates = _spec_candidates(ref.spec, base)
        source = next((p for p in candidates if p.is_file()), None)
        if source is None:
            tried = " or ".join(str(p) for p in candidates)
            raise _PlanFailed(f"an existing spec file ({tried} does not exist)")
        key = (str(source), *sorted(ref.overrides))
        chain = [Path(k[0]).name for k in stack]
        if key in stack:
            raise _PlanFailed("no reference cycle; the chain is "
                              + " -> ".join([*chain, source.name]))
        try:
            document = load_file(source)
            if ref.overrides:
                apply_overrides(document, list(ref.overrides))
            spec = validate(document, get_registry(), _stack=(*stack, key))
        except SpecError as exc:
            raise _PlanFailed(f"a valid spec; {source} has {len(exc.issues)} problem(s)",
                              exc.issues) from None
        model.source, model.document, model.spec = source, document, spec
        model.hash = spec_hash(spec)
        return
    try:
        folder = find_run_folder(ref.run or "")
    except ModelReferenceError as exc:
        raise _PlanFailed(str(exc)) from None
    try:
        document = load_file(folder / SPEC_FILE)
        spec = validate(document, get_registry(), _stack=stack)
    except SpecError as exc:
        raise _PlanFailed(f"a run folder whose spec.yaml is valid; {folder} has "
                          f"{len(exc.issues)} problem(s)", exc.issues) from None
    record = read_record(folder) or {}
    recorded = record.get("train_hash") or spec_hash(spec)
    if ref.hash is not None and ref.hash != recorded:
        raise _PlanFailed(f"the run with hash {ref.hash[:12]}; {folder} holds "
                          f"{recorded[:12]} (its model changed since it was referenced)")
    model.run_dir, model.document, model.spec, model.hash = folder, document, spec, recorded


def check_references(spec: Spec, document: Document, registry: Registry,
                     stack: tuple[tuple[str, ...], ...] = ()) -> list[SpecIssue]:
    """Plan every reference of a validated ``spec``: the issues found (field, line, what)."""
    from diffusers_kit.spec.errors import SpecIssue

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
            plan_reference(model, base, stack)
        except _PlanFailed as exc:
            issues.append(SpecIssue(path, exc.message, model.ref.to_config(), line, where))
            issues.extend(exc.issues)
            continue
        _set_model(spec, path, model)
    return issues


def spec_view(spec: Any) -> dict[str, Any]:
    """A validated spec as nested dicts that share the spec's own component mappings (so that
    a value set in the view is set in the spec)."""
    from pydantic import BaseModel

    return {name: spec_view(value) if isinstance(value, BaseModel) else value
            for name, value in ((n, getattr(spec, n)) for n in type(spec).model_fields)}


def _set_model(spec: Spec, path: SpecPath, model: TrainedModel) -> None:
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
    from diffusers_kit import __version__
    from diffusers_kit.registry import BUILTIN_SOURCE

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

    kinds = {"data": "data", "autoencoder": "autoencoder", "process": "process",
             "network": "network", "objective": "objective"}
    for section, kind in kinds.items():
        walk(kind, resolved.get(section))
    walk("optimizer", (resolved.get("train") or {}).get("optimizer"))
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


def spec_hash(spec: Spec) -> str:
    """The training hash of a validated spec (its references already planned)."""
    from diffusers_kit.registry import get_registry

    registry = get_registry()
    if spec.model is not None and isinstance(spec.model, TrainedModel):
        assert spec.model.hash is not None
        return spec.model.hash  # a spec that samples another's model trains nothing itself
    return training_hash(resolve_spec(spec, registry), registry)


def resolve_spec(spec: Spec, registry: Registry) -> dict[str, Any]:
    """``spec`` with every component's defaults filled in (what a run folder's spec.yaml holds)."""
    from diffusers_kit.graph import Builder

    builder = Builder(registry, None)
    resolved = spec.model_dump()
    for section, kind in (("data", "data"), ("autoencoder", "autoencoder"),
                          ("process", "process"), ("network", "network"),
                          ("objective", "objective")):
        if resolved.get(section) is not None:
            resolved[section] = builder.resolve(kind, getattr(spec, section))
    resolved["train"]["optimizer"] = builder.resolve("optimizer", spec.train.optimizer)
    if spec.sample is not None:
        resolved["sample"]["solver"] = builder.resolve("solver", spec.sample.solver)
        resolved["sample"]["guidance"] = [builder.resolve("guidance", g)
                                          for g in spec.sample.guidance]
    if spec.restore is not None:
        resolved["restore"]["method"] = builder.resolve("guidance", spec.restore.method)
        if spec.restore.solver is not None:
            resolved["restore"]["solver"] = builder.resolve("solver", spec.restore.solver)
    resolved["evaluate"]["metrics"] = [builder.resolve("metric", m)
                                       for m in spec.evaluate.metrics]
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
        _set(sections, path, {"model": digest})
    for section, key in NOT_HASHED:
        (sections.get(section) or {}).pop(key, None)
    payload = {"sections": sections, "versions": _versions(resolved, registry)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _recorded_hash(value: Any) -> str:
    with contextlib.suppress(ValueError):
        ref = ModelRef.parse(value)
        if ref.hash:
            return ref.hash
    return json.dumps(value, sort_keys=True, default=str)


# -- run records, latest, locks ------------------------------------------------------------------
def read_record(folder: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder (None when absent or unreadable)."""
    try:
        return json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (a reader never sees half of it)."""
    from diffusers_kit.checkpoint import atomic_write_bytes

    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write_bytes(folder / RUN_RECORD,
                       lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def follow_latest(folder: Path) -> Path:
    """``<root>/<name>/latest`` -> the run folder it points to (symlink or one-line file)."""
    if folder.name == LATEST and folder.is_file() and not folder.is_symlink():
        target = folder.read_text(encoding="utf-8").strip()
        return folder.parent / target
    return folder.resolve() if folder.is_symlink() else folder


def point_latest(folder: Path) -> None:
    """Make ``<root>/<name>/latest`` point to ``folder`` (atomically replaced)."""
    link = folder.parent / LATEST
    tmp = folder.parent / f".{LATEST}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(folder.name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):
        tmp.write_text(folder.name + "\n", encoding="utf-8")
    os.replace(tmp, link)


def run_folders(root: Path, name: str | None = None) -> list[Path]:
    """Run folders under ``root`` (of one spec name, or all), oldest first."""
    if not root.is_dir():
        return []
    groups = [root / name] if name else sorted(p for p in root.iterdir() if p.is_dir()
                                               and not p.name.startswith("."))
    found = []
    for group in groups:
        if not group.is_dir() or group.is_symlink():
            continue
        for folder in sorted(group.iterdir()):
            if (folder.is_dir() and not folder.is_symlink() and folder.name != LATEST
                    and not folder.name.startswith(".")):
                found.append(folder)
    return found


def find_finished(root: Path, digest: str) -> Path | None:
    """The newest finished run under ``root`` whose training hash is ``digest``, with its
    checkpoint in place."""
    best: tuple[str, Path] | None = None
    for folder in run_folders(root):
        record = read_record(folder)
        if (record and record.get("status") == "finished" and record.get("train_hash") == digest
                and record.get("trained", True) and (folder / CHECKPOINT).is_file()):
            key = str(record.get("finished", ""))
            if best is None or key >= best[0]:
                best = (key, folder)
    return best[1] if best else None


@contextlib.contextmanager
def build_lock(root: Path, digest: str, console: Console | None = None,
               what: str = "") -> Iterator[None]:
    """Hold an exclusive lock for building the model with hash ``digest`` under ``root``.

    A second process that needs the same model waits here, then finds the finished run.
    The lock lives in ``<root>/.locks/`` and is released by the OS if the holder dies.
    """
    folder = root / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{digest[:32]}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): builds are not serialised
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if console is not None:
                console.print(f"waiting for another dkit that is building {what or digest[:12]}",
                              soft_wrap=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def alive_marker(folder: Path) -> Iterator[None]:
    """Hold a lock on ``folder/.alive`` while a run executes, so that ``dkit runs`` can tell a
    running run from one that was killed (its record still says running, but nobody holds it)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    marker = folder / ALIVE
    with open(marker, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # left behind only by a killed process
                marker.unlink()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def live_status(folder: Path, record: dict[str, Any] | None) -> str:
    """The status to show: a record saying ``running`` whose process is gone is interrupted."""
    if record is None:
        return "unknown"
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    try:
        import fcntl
    except ImportError:
        return status
    if not (folder / ALIVE).exists():
        return "interrupted"
    try:
        with open(folder / ALIVE, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except BlockingIOError:
        return "running"
    except OSError:
        return status
    return "interrupted"


@dataclass
class Dependency:
    """One model a run used: where the spec named it, what it referenced, which run, its hash."""

    field: str
    reference: str | dict[str, Any]
    run: str
    hash: str
    reused: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "reference": self.reference, "run": self.run,
                "hash": self.hash, "reused": self.reused}


@dataclass
class BuildSettings:
    """How references are built: the output root, ``--rebuild``, where progress goes."""

    root: Path
    rebuild: bool = False
    console: Console | None = None
    quiet: bool = False
    dependencies: list[Dependency] = field(default_factory=list)


def build_reference(model: TrainedModel, *, root: Path, rebuild: bool = False,
                    console: Console | None = None, quiet: bool = False) -> Path:
    """Make sure the model ``model`` refers to exists as a finished run; returns its folder.

    A run-folder reference is used as it is. A spec reference reuses the newest finished run
    with its hash under ``root`` (unless ``rebuild``), else runs the spec's train stage there.
    """
    if model.run_dir is not None:  # a run folder (or one recorded when the reference was built)
        return model.run_dir
    assert model.spec is not None and model.hash is not None and model.document is not None
    from diffusers_kit.graph import execute

    what = f"{model.spec.name} ({model.hash[:12]})"
    with build_lock(root, model.hash, console, what):
        found = None if rebuild else find_finished(root, model.hash)
        if found is not None:
            model.run_dir, model.reused = found, True
            if console is not None and not quiet:
                console.print(f"reusing [bold]{what}[/]: {found}", soft_wrap=True)
            return found
        if console is not None and not quiet:
            console.print(f"building [bold]{what}[/] from {model.source}", soft_wrap=True)
        run = execute(model.spec, model.document, only="train", console=console, quiet=quiet,
                      root=root, rebuild=rebuild, dependency=True)
        assert run.dir is not None
        model.run_dir, model.reused = run.dir, False
        return run.dir


def build_references(spec: Spec, registry: Registry, settings: BuildSettings) -> None:
    """Build (or reuse) every model ``spec`` refers to, depth first; records the dependencies."""
    from diffusers_kit.spec.errors import dotted

    done: dict[str, tuple[Path, bool | None]] = {}  # one build (and one message) per model
    for path, model in references(spec, registry):
        if model.run_dir is None and model.hash in done:
            model.run_dir, model.reused = done[model.hash]
        else:
            build_reference(model, root=settings.root, rebuild=settings.rebuild,
                            console=settings.console, quiet=settings.quiet)
        assert model.run_dir is not None and model.hash is not None
        done[model.hash] = (model.run_dir, model.reused)
        settings.dependencies.append(Dependency(dotted(path), model.ref.to_config(),
                                                str(model.run_dir), model.hash, model.reused))


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")

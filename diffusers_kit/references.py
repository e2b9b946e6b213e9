"""Model references: a trained model named in a spec, as a value a component receives.

A component that needs a model trained elsewhere (a classifier for guidance, the feature network
of a metric, an autoencoder, the model to sample from) types that constructor parameter as
:class:`TrainedModel`. In a spec the value is a reference, in one of these forms::

    features: runs/features_digits/latest                  # a run folder (or its ``latest``)
    features: specs/features_digits.yaml                   # a spec file, built when needed
    features: {spec: features_digits.yaml, overrides: {train.steps: 500}}
    features: {run: runs/features_digits/20261123-101500}

This module is a leaf: components import it, and it imports no run machinery. Loading or
building what a reference names goes through a :class:`ModelStore`, which the run layer
(:mod:`diffusers_kit.run`) installs with :func:`install_store` when it is imported (importing
``diffusers_kit`` imports it). Planning and hashing are :mod:`diffusers_kit.spec.references`'s,
building and reuse :mod:`diffusers_kit.run.execution`'s.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

if TYPE_CHECKING:
    from rich.console import Console

    from diffusers_kit.data.base import DataSplits
    from diffusers_kit.diffusion import Diffusion
    from diffusers_kit.networks.base import Network
    from diffusers_kit.spec.loader import Document
    from diffusers_kit.spec.models import Spec

SPEC_SUFFIXES = (".yaml", ".yml")

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

    Built by the run layer (through the :class:`ModelStore`) from a :class:`ModelRef` (the
    dependency is trained first when no finished run has its hash), or in Python with
    :meth:`resolve` or :meth:`from_diffusion`.
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
        model_store().resolve(model, root=Path(root), rebuild=rebuild, quiet=quiet,
                              console=console)
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
            loaded = model_store().load(self.run_dir)
            self.spec = self.spec or loaded.spec
            self._diffusion, self._data = loaded.diffusion, loaded.data
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


# -- how a reference reaches its model -----------------------------------------------------------
@dataclass
class LoadedModel:
    """What a store hands back for a finished run: its validated spec, the model with its
    checkpoint loaded, and the data splits it was trained on."""

    spec: Spec
    diffusion: Diffusion
    data: DataSplits | None


class ModelStore(Protocol):
    """Loads and builds what references name. The run layer installs the one dkit uses."""

    def resolve(self, model: TrainedModel, *, root: Path, rebuild: bool, quiet: bool,
                console: Console | None) -> None:
        """Plan ``model``'s reference (raising :class:`ModelReferenceError`) and build it when
        no finished run has its hash: afterwards ``model.run_dir`` is set."""

    def load(self, run_dir: Path) -> LoadedModel:
        """The finished run in ``run_dir``, rebuilt from its resolved spec and checkpoint."""


_STORE: list[ModelStore] = []


def install_store(store: ModelStore) -> None:
    """Make ``store`` the one that loads and builds references (the run layer calls this)."""
    _STORE[:] = [store]


def model_store() -> ModelStore:
    """The installed store; importing ``diffusers_kit`` installs the run layer's."""
    if not _STORE:
        raise RuntimeError("no model store is installed: import diffusers_kit (its run layer, "
                           "diffusers_kit.run, installs the store that loads trained models)")
    return _STORE[0]


def open_run(run_dir: str | Path) -> tuple[Spec, LoadedModel]:
    """The finished run in ``run_dir`` (``latest`` followed), loaded through the store: its
    spec and its model (``.diffusion``, ``.data``)."""
    loaded = model_store().load(Path(run_dir))
    return loaded.spec, loaded


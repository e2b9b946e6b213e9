"""Component registry: kind -> name -> component, filled by plugins through pluggy.

Each component's constructor signature is its schema. :func:`params_model` turns the
signature (type hints, ``Annotated[..., Field(...)]`` constraints, defaults) into a pydantic
model, so that the YAML mapping ``{kind: ve, sigma_max: 50}`` and the call ``VE(sigma_max=50)``
are validated by the same rules. A parameter annotated with a kind's base class (or a list of
it) takes a nested ``{kind: ...}`` mapping. A kind's base class may name options every component of
the kind accepts besides its constructor's own (``dkit_options``: a solver's ``record``); they
join each component's schema unless the constructor declares them itself.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata as metadata
import inspect
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
import pydantic
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from diffusers_kit import builtin, hookspecs
from diffusers_kit.hookspecs import PLUGIN_API_VERSION

ENTRY_POINT_GROUP = "diffusers_kit"
BUILTIN_SOURCE = "diffusers_kit"

#: Old kind names that still work, each with a DeprecationWarning naming its new name: the spec
#: section is ``data:``, so its kind is ``data`` (it was ``dataset``).
KIND_ALIASES = {"dataset": "data"}


class NestedBuildError(ValueError):
    """A nested component (``path`` below its parent, e.g. ``("operator",)``) could not be
    built: ``error`` is what its constructor or its parameters' validation raised."""

    def __init__(self, path: tuple[Any, ...], config: Any, error: Exception) -> None:
        super().__init__(str(error))
        self.path, self.config, self.error = path, config, error


class RegistryError(LookupError):
    """An unknown kind or component name (carries suggestions)."""

    def __init__(
        self, message: str, suggestions: list[str] | None = None, expected: str = ""
    ) -> None:
        super().__init__(message)
        self.suggestions = suggestions or []
        self.expected = expected or message


@dataclass(frozen=True)
class NestedParam:
    """A constructor parameter that takes another component (or a list of them)."""

    kind: str
    many: bool = False
    optional: bool = False


@dataclass
class Component:
    """A registered component: the factory plus what the spec system derived from it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str
    doc: str
    params: type[pydantic.BaseModel]
    nested: dict[str, NestedParam]
    context: tuple[str, ...]

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


@dataclass
class Kind:
    name: str
    base: type
    doc: str
    components: dict[str, Component] = field(default_factory=dict)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module, for a warning that points at
    the plugin's line rather than at the registry (or its per-pass wrappers)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    return level


def suggest(word: str, choices: typing.Iterable[str]) -> list[str]:
    """Close matches for "did you mean ..." messages."""
    return difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _strip_annotated(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


class Registry:
    """All kinds and components known to this process."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}
        self.plugin_errors: dict[str, str] = {}
        #: seconds each plugin's entry point took to import (``distribution:entry-point``)
        self.plugin_import_seconds: dict[str, float] = {}
        #: what a plugin still does the old way (a renamed kind), once per message
        self.deprecations: dict[str, None] = {}
        self._source = BUILTIN_SOURCE

    def canonical_kind(self, kind: str, where: str = "") -> str:
        """``kind`` under its current name. An old name in :data:`KIND_ALIASES` still works,
        with a ``DeprecationWarning`` and a line in :attr:`deprecations` (which ``dkit plugins``
        prints) naming the change and the call that used it (``where``)."""
        new = KIND_ALIASES.get(kind)
        if new is None:
            return kind
        message = (f"{where or kind}: the component kind {kind!r} is now {new!r} (the spec "
                   f"section is {new}:); {kind!r} still works, with this warning, but will be "
                   f"removed: write {new!r}")
        self.deprecations.setdefault(message)
        warnings.warn(message, DeprecationWarning, stacklevel=_caller_level())
        return new

    # -- filling ---------------------------------------------------------------------------
    def add_kind(self, name: str, base: type, doc: str = "") -> None:
        """Declare a kind of component; ``base`` is the class every component of it derives."""
        name = self.canonical_kind(name, f"{self._source}: registry.add_kind({name!r})")
        if name in self.kinds and self.kinds[name].base is not base:
            raise ValueError(f"kind {name!r} is already registered with another base class")
        self.kinds.setdefault(name, Kind(name, base, doc or (base.__doc__ or "").strip()))

    def add(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        *,
        doc: str | None = None,
    ) -> Component:
        """Register ``factory`` (usually a class) as component ``name`` of ``kind``.

        Class attribute ``dkit_context`` (a tuple of parameter names) lists parameters the run
        graph supplies (for example a network's ``data_shape``); they are not part of the spec.
        """
        kind = self.canonical_kind(kind, f"{self._source}: registry.add({kind!r}, {name!r})")
        if kind not in self.kinds:
            raise RegistryError(
                f"cannot register {name!r}: unknown kind {kind!r}", suggest(kind, self.kinds)
            )
        table = self.kinds[kind].components
        if name in table:
            prior = table[name]
            raise ValueError(
                f"{kind} {name!r} from {self._source} clashes with the one from {prior.source}"
            )
        self._check_base(kind, name, factory)
        context = tuple(getattr(factory, "dkit_context", ()))
        params, nested = self._params_model(kind, name, factory, context)
        self._check_defaults(kind, name, params, nested)
        component = Component(
            kind=kind,
            name=name,
            factory=factory,
            source=self._source,
            doc=doc if doc is not None else inspect.getdoc(factory) or "",
            params=params,
            nested=nested,
            context=context,
        )
        table[name] = component
        return component

    def _check_base(self, kind: str, name: str, factory: Callable[..., Any]) -> None:
        """A component must be (or be made by a function declared to return) a subclass of its
        kind's base class: checked here, not discovered half-way through a run."""
        base = self.kinds[kind].base
        wanted = f"{base.__module__}.{base.__qualname__}"
        if inspect.isclass(factory):
            made = factory
        elif callable(factory):
            try:
                made = typing.get_type_hints(factory).get("return")
            except Exception:  # an unresolvable annotation: treated as undeclared
                made = None
            if not inspect.isclass(made):
                raise TypeError(f"{kind} {name!r} from {self._source}: a factory function must "
                                f"declare its return type, a subclass of {wanted}")
        else:
            raise TypeError(f"{kind} {name!r} from {self._source}: expected a class deriving "
                            f"from {wanted}, given {factory!r}")
        if not issubclass(made, base):
            raise TypeError(f"{kind} {name!r} from {self._source}: {made.__qualname__} does not "
                            f"derive from {wanted}, the base class of kind {kind!r}")

    def _check_defaults(self, kind: str, name: str, params: type[pydantic.BaseModel],
                        nested: dict[str, NestedParam]) -> None:
        """Every default must satisfy its own parameter's type and bounds: a default the
        schema refuses would be accepted silently (it is never validated) and a user who
        writes the same value gets an error."""
        for pname, info in params.model_fields.items():
            if pname in nested or info.is_required() or info.default is None:
                continue
            try:
                annotation = (typing.Annotated[(info.annotation, *info.metadata)]
                              if info.metadata else info.annotation)
                pydantic.TypeAdapter(annotation).validate_python(info.default)
            except pydantic.ValidationError as exc:
                problem = exc.errors()[0].get("msg", str(exc))
                raise TypeError(f"{kind} {name!r} from {self._source}: the default of "
                                f"{pname!r}, {info.default!r}, violates its own constraint "
                                f"({problem})") from None

    def _nested_kind(self, annotation: Any) -> NestedParam | None:
        annotation = _strip_annotated(annotation)
        inner, optional = _strip_optional(annotation)
        inner = _strip_annotated(inner)
        many = False
        if typing.get_origin(inner) in (list, tuple, typing.Sequence):
            args = typing.get_args(inner)
            if args:
                inner, many = _strip_annotated(args[0]), True
        if isinstance(inner, type):
            for kind in self.kinds.values():
                if issubclass(inner, kind.base):
                    return NestedParam(kind.name, many=many, optional=optional)
        return None

    def _params_model(
        self, kind: str, name: str, factory: Callable[..., Any], context: tuple[str, ...]
    ) -> tuple[type[pydantic.BaseModel], dict[str, NestedParam]]:
        target = factory.__init__ if inspect.isclass(factory) else factory
        signature = inspect.signature(target)
        try:
            hints = typing.get_type_hints(target, include_extras=True)
        except Exception as exc:  # unresolvable forward reference: a bug in the plugin
            raise TypeError(f"{kind} {name!r}: cannot resolve type hints ({exc})") from exc
        fields: dict[str, Any] = {}
        nested: dict[str, NestedParam] = {}
        for pname, parameter in signature.parameters.items():
            if pname == "self" or pname in context:
                continue
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            annotation = hints.get(pname, Any)
            default = ... if parameter.default is parameter.empty else parameter.default
            sub = self._nested_kind(annotation)
            if sub is not None:
                nested[pname] = sub
                # validated recursively by the spec system; here only "present or not"
                annotation = Any
                if default is not ... and default is not None:
                    default = None
            fields[pname] = (annotation, default)
        # options the kind's base class accepts for every component (a solver's ``record``),
        # unless the constructor declares them itself
        made = factory if inspect.isclass(factory) else hints.get("return")
        for pname, annotation in getattr(made, "dkit_options", {}).items():
            fields.setdefault(pname, (annotation, None))
        config = pydantic.ConfigDict(
            extra="forbid", arbitrary_types_allowed=True, title=f"{kind}:{name}"
        )
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{kind}_{name}_params", __config__=config, **fields
        )
        return model, nested

    # -- lookup ----------------------------------------------------------------------------
    def kind(self, kind: str) -> Kind:
        kind = self.canonical_kind(kind, f"registry.kind({kind!r})")
        if kind not in self.kinds:
            raise RegistryError(f"unknown component kind {kind!r}", suggest(kind, self.kinds),
                                f"a component kind: {', '.join(sorted(self.kinds))}")
        return self.kinds[kind]

    def get(self, kind: str, name: str) -> Component:
        kind = self.canonical_kind(kind, f"registry.get({kind!r}, {name!r})")
        table = self.kind(kind).components
        if name not in table:
            raise RegistryError(
                f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or 'none'}",
                suggest(name, table),
                f"a registered {kind}: {', '.join(sorted(table)) or 'none'}",
            )
        return table[name]

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = [self.kind(kind)] if kind else list(self.kinds.values())
        return [c for k in kinds for c in sorted(k.components.values(), key=lambda c: c.name)]

    def name_of(self, obj: Any) -> tuple[str, str] | None:
        """(kind, name) of the component whose factory built ``obj``, if any."""
        for kind in self.kinds.values():
            for component in kind.components.values():
                if type(obj) is component.factory:
                    return kind.name, component.name
        return None

    # -- building --------------------------------------------------------------------------
    def build(self, kind: str, config: dict[str, Any], **context: Any) -> Any:
        """Instantiate a component from an already validated ``{kind: name, ...}`` mapping."""
        config = dict(config)
        kind = self.canonical_kind(kind, f"registry.build({kind!r}, ...)")
        component = self.get(kind, config.pop("kind"))
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            sub = component.nested.get(key)
            if sub is None or value is None:
                kwargs[key] = value
            elif sub.many:  # nested components get the same context (e.g. data_shape)
                kwargs[key] = [self._build_nested(sub.kind, item, (key, i), context)
                               for i, item in enumerate(value)]
            else:
                kwargs[key] = self._build_nested(sub.kind, value, (key,), context)
        validated = component.params.model_validate(kwargs)  # nested ones: present or not
        final = {k: getattr(validated, k) for k in validated.model_fields_set
                 if k not in component.nested}
        final.update({k: v for k, v in kwargs.items() if k in component.nested})
        final.update({k: v for k, v in context.items() if k in component.context})
        return component.factory(**final)

    def resolve(self, kind: str, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` (a validated ``{kind: name, ...}`` mapping) with every default filled in,
        nested components included: what a run folder's resolved spec.yaml holds."""
        component = self.get(kind, config["kind"])
        plain = {k: v for k, v in config.items() if k != "kind"}
        dumped = component.params.model_validate(plain).model_dump()
        full: dict[str, Any] = {"kind": config["kind"], **{
            k: v for k, v in dumped.items() if k not in component.nested}}
        for key, sub in component.nested.items():
            value = config.get(key)
            if value is None:
                full[key] = None
            elif sub.many:
                full[key] = [self.resolve(sub.kind, item) for item in value]
            else:
                full[key] = self.resolve(sub.kind, value)
        return full

    def _build_nested(self, kind: str, config: dict[str, Any], path: tuple[Any, ...],
                      context: dict[str, Any]) -> Any:
        try:
            return self.build(kind, config, **context)
        except NestedBuildError as exc:
            raise NestedBuildError(path + exc.path, exc.config, exc.error) from exc.error
        except (ValueError, TypeError) as exc:
            raise NestedBuildError(path, config, exc) from exc


# -- plugin manager --------------------------------------------------------------------------
def _distribution_of(plugin: Any, dists: dict[str, str]) -> str:
    module = getattr(plugin, "__name__", type(plugin).__module__)
    top = module.split(".")[0]
    return dists.get(module, dists.get(top, top))


def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, str], dict[str, str]]:
    """A plugin manager with every entry point of group ``diffusers_kit`` loaded.

    Returns ``(manager, errors, sources)``: ``errors`` maps a plugin that failed to import to its
    error message (the other plugins still load); ``sources`` maps module -> distribution.
    """
    manager = _IsolatingManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    IMPORT_SECONDS.clear()
    errors: dict[str, str] = {}
    sources: dict[str, str] = {}
    labels: dict[int, str] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist else entry_point.name
        label = f"{dist}:{entry_point.name}"
        if manager.get_plugin(entry_point.name) is not None:
            continue
        started = time.perf_counter()
        try:
            with _exit_refused():
                plugin = entry_point.load()
            refusal = api_refusal(plugin)
            if refusal is not None:
                errors[label] = refusal
                continue
            manager.register(plugin, name=entry_point.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # sys.exit() or worse in a plugin must not silence dkit
            errors[label] = _describe(exc)
            continue
        finally:
            IMPORT_SECONDS[label] = time.perf_counter() - started
        labels[id(plugin)] = label
        sources[entry_point.value.split(":")[0]] = dist
    if not manager.is_registered(builtin):  # running from a source tree that is not installed
        manager.register(builtin, name="builtin")
        sources[builtin.__name__] = BUILTIN_SOURCE
    check_pending(manager, errors, labels)
    return manager, errors, sources


#: seconds each entry point took to import in the last :func:`plugin_manager` call
IMPORT_SECONDS: dict[str, float] = {}
#: an import slower than this is named on every command (:func:`slow_plugin_notes`)
SLOW_IMPORT_SECONDS = 3.0


class PluginExit(BaseException):
    """``os._exit(code)`` called by a plugin while dkit imported or registered it."""

    def __init__(self, code: object) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _exit_refused() -> typing.Iterator[None]:
    """``os._exit`` raises :class:`PluginExit` inside this block. A plugin calling it at import
    would otherwise end every dkit command at once, with its status and no output (atexit
    handlers and ``finally`` blocks do not run); the plugin is reported instead."""
    real = os._exit

    def refuse(code: int) -> typing.NoReturn:
        raise PluginExit(code)

    os._exit = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        os._exit = real


def slow_plugin_notes(registry: Registry) -> list[str]:
    """One line per plugin whose import took longer than :data:`SLOW_IMPORT_SECONDS`."""
    return [f"plugin {label} took {seconds:.1f} s to import, and every dkit command waits for "
            "it (dkit plugins lists each plugin's import time; a plugin should import heavy "
            "libraries inside the functions that use them)"
            for label, seconds in registry.plugin_import_seconds.items()
            if seconds > SLOW_IMPORT_SECONDS]


def api_refusal(plugin: Any) -> str | None:
    """Why ``plugin`` cannot be loaded by this dkit, or None: its module-level
    ``DKIT_PLUGIN_API`` (a version specifier such as ``">=1.0,<2"``, checked with
    ``packaging.specifiers``) must admit :data:`~diffusers_kit.hookspecs.PLUGIN_API_VERSION`.
    A plugin that declares nothing is loaded (it predates the declaration)."""
    required = getattr(plugin, "DKIT_PLUGIN_API", None)
    if required is None:
        return None
    try:
        specifier = SpecifierSet(str(required))
    except InvalidSpecifier:
        return (f"DKIT_PLUGIN_API = {required!r} is not a version specifier (write e.g. "
                f"'>={PLUGIN_API_VERSION},<{int(PLUGIN_API_VERSION.split('.')[0]) + 1}'); "
                "the plugin is not loaded")
    if specifier.contains(PLUGIN_API_VERSION, prereleases=True):
        return None
    return (f"requires the dkit plugin API {specifier}, and this dkit provides "
            f"{PLUGIN_API_VERSION}: the plugin is not loaded (install a version of the plugin "
            "made for this dkit, or a dkit that provides that API)")


def _hook_names() -> list[str]:
    return [name for name in vars(hookspecs) if name.startswith("dkit_")]


def check_pending(manager: pluggy.PluginManager, errors: dict[str, str],
                  labels: dict[int, str] | None = None) -> None:
    """pluggy's ``check_pending``: every hook implementation must match a hook of
    :mod:`~diffusers_kit.hookspecs` (a misspelled ``dkit_run_finish`` would otherwise never be
    called, silently). A plugin that implements an unknown hook is unregistered and reported in
    ``errors`` under its label (``distribution:entry-point``) with the hook's name and the
    closest real one; the other plugins keep working. An implementation marked
    ``@hookimpl(optionalhook=True)`` (a hook of a newer dkit) is allowed."""
    labels = labels or {}
    while True:
        try:
            manager.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            plugin = exc.plugin
            unknown = sorted(
                name for name, caller in vars(manager.hook).items()
                if not name.startswith("_") and not caller.has_spec()
                and any(impl.plugin is plugin and not impl.optionalhook
                        for impl in caller.get_hookimpls()))
            hooks = []
            for name in unknown:
                close = suggest(name, _hook_names())
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                hooks.append(f"{name!r}{hint}")
            label = labels.get(id(plugin)) or manager.get_name(plugin) or repr(plugin)
            errors[label] = (f"implements unknown hook {', '.join(hooks)}: the plugin is not "
                             f"loaded; the hooks are {', '.join(_hook_names())}")
            manager.unregister(plugin)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    if isinstance(exc, PluginExit):
        return (f"the plugin called os._exit({exc.code!r}), which would have ended dkit at once "
                "with no output; the plugin is not loaded")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snapshot(registry: Registry) -> dict[str, set[str]]:
    return {name: set(kind.components) for name, kind in registry.kinds.items()}


def _roll_back(registry: Registry, before: dict[str, set[str]]) -> None:
    """Remove what was registered since ``before``: a failed plugin leaves nothing behind."""
    for name in list(registry.kinds):
        if name not in before:
            del registry.kinds[name]
            continue
        table = registry.kinds[name].components
        for component in list(table):
            if component not in before[name]:
                del table[component]


def collect(
    manager: pluggy.PluginManager, errors: dict[str, str], sources: dict[str, str]
) -> Registry:
    """Ask every plugin (built-in first) to register its kinds and components.

    A plugin whose ``dkit_register`` raises (anything but KeyboardInterrupt) is reported in
    ``registry.plugin_errors`` and everything it had registered, kinds included, is removed."""
    registry = Registry()
    registry.plugin_errors = dict(errors)
    registry.plugin_import_seconds = dict(IMPORT_SECONDS)
    plugins = manager.get_plugins()
    ordered = sorted(plugins, key=lambda p: p is not builtin)
    failed: set[int] = set()
    added: dict[int, dict[str, set[str]]] = {}  # plugin -> the registry before its kinds
    # kinds first, so that a plugin's components may nest any kind, whatever the load order
    for phase in ("kinds", "components"):
        for plugin in ordered:
            if not hasattr(plugin, "dkit_register") or id(plugin) in failed:
                continue
            registry._source = _distribution_of(plugin, sources)
            others = [p for p in plugins if p is not plugin]
            caller = manager.subset_hook_caller("dkit_register", remove_plugins=others)
            before = _snapshot(registry)
            if phase == "kinds":
                added[id(plugin)] = before
            try:
                with _exit_refused():
                    if phase == "kinds":
                        caller(registry=_KindsOnly(registry))
                    else:
                        caller(registry=_ComponentsOnly(registry))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                name = manager.get_name(plugin) or registry._source
                registry.plugin_errors[f"{registry._source}:{name}"] = _describe(exc)
                failed.add(id(plugin))
                _roll_back(registry, before)
                if phase == "components":  # its kinds too, unless another plugin filled them
                    for kind in set(registry.kinds) - set(added[id(plugin)]):
                        if not registry.kinds[kind].components:
                            del registry.kinds[kind]
    registry._source = BUILTIN_SOURCE
    return registry


# -- life-cycle hooks: a plugin that raises is reported, the run goes on ----------------------
@dataclass
class HookFailure:
    plugin: str
    hook: str
    error: str


HOOK_FAILURES: list[HookFailure] = []


def _contained(plugin: str, hook: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            failure = HookFailure(plugin, hook, _describe(exc))
            HOOK_FAILURES.append(failure)
            print(f"warning: plugin {plugin!r} failed in {hook}: {failure.error} (the run goes "
                  "on without it)", file=sys.stderr)
            return None

    return call


class _IsolatingManager(pluggy.PluginManager):
    """A plugin manager whose plugins' life-cycle hooks cannot break a run.

    Every implementation of a hook other than ``dkit_register`` (which :func:`collect` contains
    and rolls back) is wrapped: an exception is recorded in :data:`HOOK_FAILURES`, printed, and
    the run continues; ``dkit`` then exits with status 5. Wrappers (``wrapper=True``) are left
    alone: they must yield, which a catch-all cannot do for them."""

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if plugin is builtin:
            return registered
        label = self.get_name(plugin) or str(registered)
        for caller in self.get_hookcallers(plugin) or []:
            if caller.name == "dkit_register":
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _contained(label, caller.name, impl.function)
        return registered


class _KindsOnly:
    """First pass: a plugin's ``add_kind`` calls take effect, ``add`` calls are ignored."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def add_kind(self, *args: Any, **kwargs: Any) -> None:
        self._registry.add_kind(*args, **kwargs)

    def add(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, item: str) -> Any:
        return getattr(self._registry, item)


class _ComponentsOnly(_KindsOnly):
    """Second pass: components are added; kinds were already declared."""

    def add_kind(self, *args: Any, **kwargs: Any) -> None:
        return None

    def add(self, *args: Any, **kwargs: Any) -> Component:
        return self._registry.add(*args, **kwargs)


_REGISTRY: Registry | None = None
_MANAGER: pluggy.PluginManager | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from all installed plugins."""
    global _REGISTRY, _MANAGER
    if _REGISTRY is None:
        _MANAGER, errors, sources = plugin_manager()
        _REGISTRY = collect(_MANAGER, errors, sources)
        for note in slow_plugin_notes(_REGISTRY):  # a slow import delays every command
            print(f"note: {note}", file=sys.stderr)
    return _REGISTRY


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager behind :func:`get_registry` (for the life-cycle hooks)."""
    get_registry()
    assert _MANAGER is not None
    return _MANAGER


def reset_registry() -> None:
    """Forget the cached registry (tests that install plugins call this)."""
    global _REGISTRY, _MANAGER
    _REGISTRY = None
    _MANAGER = None

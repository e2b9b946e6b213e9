"""mkdocs hook: fills the spec reference's markers with tables generated from the code.

- ``<!-- dkit:spec -->``: the top-level fields of a spec (:class:`~diffusers_kit.spec.models.Spec`);
- ``<!-- dkit:sections -->``: a heading and a field table for every section model a spec holds
  (``train``, ``sample``, ``restore``, ``evaluate``, ``output``, and any section added later);
- ``<!-- dkit:components -->``: every registered built-in component with its parameters.

Each row gives the type (a ``Literal``'s allowed values, ``or none`` for an Optional, the kind of
a nested component), the default as it is written in YAML, the bounds, and the meaning: the
field's ``description`` (for a component parameter, the ``Args:`` entry of its docstring). The
reference therefore never goes stale: a new field or component appears with what its code says
(``tests/test_docs_reference.py`` checks that every one of them reaches the page).
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

SPEC_MARKER = "<!-- dkit:spec -->"
SECTIONS_MARKER = "<!-- dkit:sections -->"
COMPONENTS_MARKER = "<!-- dkit:components -->"
MARKER = COMPONENTS_MARKER  # the original name

#: Meanings of spec fields whose pydantic ``Field`` has no ``description`` yet (the description,
#: once written in spec/models.py, wins; the test then asks for the entry here to go).
FALLBACK_MEANINGS: dict[tuple[str, str], str] = {}


# -- rendering -------------------------------------------------------------------------------
def _prose(text: str) -> str:
    """Docstring text as Markdown: a Sphinx role (``:mod:`~a.b` ``) becomes code (the last
    name with ``~``), and ``<name>`` outside code is escaped so that it is not read as HTML."""
    def role(match: re.Match[str]) -> str:
        tilde, target = match.group(1), match.group(2)
        return f"`{target.split('.')[-1] if tilde else target}`"

    text = re.sub(r":[a-z]+:`(~?)([^`]+)`", role, text)
    parts = re.split(r"(`+[^`]*`+)", text)  # code spans at the odd indices
    return "".join(part if i % 2 else re.sub(r"<(?=[A-Za-z/!])", "&lt;", part)
                   for i, part in enumerate(parts))


def _cell(text: str) -> str:
    return _prose(text).replace("|", "\\|").replace("\n", " ")


def _yaml(value: Any) -> str:
    """``value`` as it is written in a spec (``null``, ``true``, ``{kind: adam, lr: 0.001}``)."""
    import yaml

    def plain(item: Any) -> Any:
        if isinstance(item, tuple | list):
            return [plain(i) for i in item]
        if isinstance(item, dict):
            return {str(k): plain(v) for k, v in item.items()}
        if hasattr(item, "__dataclass_fields__"):
            return {k: plain(getattr(item, k)) for k in item.__dataclass_fields__}
        return item

    try:
        text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6,
                              sort_keys=False).strip()
    except yaml.YAMLError:
        return repr(value)
    return text.removesuffix("\n...").removesuffix("...").strip()


def _default(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return "its defaults"
    return f"`{_yaml(value)}`"


def _kind_name(kind: str) -> str:
    from diffusers_kit import registry

    return getattr(registry, "KIND_ALIASES", {}).get(kind, kind)


def _component_marker(info: Any) -> Any:
    from diffusers_kit.spec.models import ComponentOf

    return next((m for m in info.metadata if isinstance(m, ComponentOf)), None)


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _section_model(annotation: Any) -> Any:
    """The section model (a pydantic model of spec/models.py) ``annotation`` holds, or None."""
    from pydantic import BaseModel

    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _nested_type(kind: str, many: bool, optional: bool) -> str:
    kind = _kind_name(kind)
    text = f"list of `{kind}` components" if many else f"`{kind}` component"
    return text + (" or none" if optional else "")


def _code_type(annotation: Any) -> str:
    from diffusers_kit.cli.plugins import _type_name

    return f"`{_cell(_type_name(annotation))}`"


def _first_paragraph(doc: str | None) -> str:
    return _prose(" ".join((doc or "").strip().split("\n\n")[0].split()))


def args_descriptions(doc: str) -> dict[str, str]:
    """The entries of a Google-style ``Args:`` section: ``{parameter: meaning}`` (continuation
    lines joined)."""
    out: dict[str, str] = {}
    lines = (doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return out
    base = len(lines[start]) - len(lines[start].lstrip())
    entry_indent = None
    current = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break
        if entry_indent is None:
            entry_indent = indent
        match = re.match(r"\*{0,2}(\w+)(?: \([^)]*\))?:\s*(.*)$", line.strip())
        if indent == entry_indent and match:
            current = match.group(1)
            out[current] = match.group(2)
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out


def parameter_meaning(component: Any, name: str) -> str:
    """A component parameter's meaning: its field ``description``, else its docstring's
    ``Args:`` entry, else empty."""
    info = component.params.model_fields[name]
    if info.description:
        return " ".join(info.description.split())
    docs = [component.doc]
    if isinstance(component.factory, type):  # a parameter its base class documents
        docs += [inspect.getdoc(cls) or "" for cls in component.factory.__mro__[1:]]
    for doc in docs:
        meaning = args_descriptions(doc).get(name)
        if meaning:
            return meaning
    return ""


def field_meaning(model: type, name: str) -> str:
    """A spec field's meaning: its ``description``, else :data:`FALLBACK_MEANINGS`."""
    info = model.model_fields[name]  # type: ignore[attr-defined]
    if info.description:
        return " ".join(info.description.split())
    return FALLBACK_MEANINGS.get((model.__name__, name), "")


def _field_row(model: type, name: str, info: Any, *, top_level: bool = False) -> str:
    from diffusers_kit.cli.plugins import _constraints

    marker = _component_marker(info)
    section = _section_model(info.annotation)
    if marker is not None:
        kind = _nested_type(marker.kind, marker.many, _optional(info.annotation))
    elif section is not None:
        kind = "section (below)" + (" or none" if _optional(info.annotation) else "")
    else:
        kind = _code_type(info.annotation)
    constraints = _cell(_constraints(info)) if marker is None and section is None else ""
    label = f"[`{name}`](#{name})" if top_level and section is not None else f"`{name}`"
    return (f"| {label} | {kind} | {_cell(_default(info))} | {constraints} | "
            f"{_cell(field_meaning(model, name))} |")


_HEADER = "| field | type | default | constraints | meaning |\n|---|---|---|---|---|"


# -- the markers -----------------------------------------------------------------------------
def section_models() -> list[tuple[str, type]]:
    """``(field name, model)`` for every section of a spec that is a model of its own."""
    from diffusers_kit.spec.models import Spec

    found = []
    for name, info in Spec.model_fields.items():
        model = _section_model(info.annotation)
        if model is not None:
            found.append((name, model))
    return found


def spec_markdown() -> str:
    """The table of a spec's top-level fields."""
    from diffusers_kit.spec.models import Spec

    rows = [_HEADER]
    for name, info in Spec.model_fields.items():
        rows.append(_field_row(Spec, name, info, top_level=True))
    return "\n".join(rows) + "\n"


def sections_markdown() -> str:
    """A ``## `section` `` heading, the model's docstring and a field table per section."""
    out = []
    for name, model in section_models():
        out.append(f"## `{name}`\n\n{_first_paragraph(model.__doc__)}\n")
        rows = [_HEADER]
        for field, info in model.model_fields.items():
            rows.append(_field_row(model, field, info))
        out.append("\n".join(rows) + "\n")
    return "\n".join(out)


def components_markdown() -> str:
    from diffusers_kit.cli.plugins import _constraints
    from diffusers_kit.registry import get_registry

    registry = get_registry()
    out: list[str] = []
    for kind in sorted(registry.kinds.values(), key=lambda k: k.name):
        out.append(f"### Kind `{kind.name}`\n\n{kind.doc}\n")
        for component in registry.components(kind.name):
            if component.source != "diffusers_kit":
                continue
            out.append(f"#### `{kind.name}: {component.name}`\n\n"
                       f"{_first_paragraph(component.doc)}\n")
            rows = ["| parameter | type | default | constraints | meaning |",
                    "|---|---|---|---|---|"]
            for name, info in component.params.model_fields.items():
                meaning = _cell(parameter_meaning(component, name))
                if name in component.nested:
                    nested = component.nested[name]
                    kind_text = _nested_type(nested.kind, nested.many,
                                             getattr(nested, "optional", False))
                    rows.append(f"| `{name}` | {kind_text} | {_cell(_default(info))} | | "
                                f"{meaning} |")
                    continue
                rows.append(f"| `{name}` | {_code_type(info.annotation)} | "
                            f"{_cell(_default(info))} | {_cell(_constraints(info))} | "
                            f"{meaning} |")
            if len(rows) == 2:
                rows.append("| *(no parameters)* | | | | |")
            out.append("\n".join(rows) + "\n")
            if component.context:
                out.append(f"Set by the run graph: {', '.join(component.context)}.\n")
    return "\n".join(out)


def reference_markdown(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated tables."""
    for marker, make in ((SPEC_MARKER, spec_markdown), (SECTIONS_MARKER, sections_markdown),
                         (COMPONENTS_MARKER, components_markdown)):
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return reference_markdown(markdown)


"""JSON Schema for spec files, covering every registered component and its parameters.

The schema lets editors (yaml-language-server) complete ``kind`` names and each component's
parameters. Each kind becomes ``$defs/<kind>``: a ``oneOf`` over its components, each an object
whose ``kind`` is a constant.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Any

from diffusers_kit.registry import KIND_ALIASES, Component, Registry
from diffusers_kit.spec.models import ComponentOf, Section, Spec, section_model

SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"


def argument_docs(factory: Any) -> dict[str, str]:
    """``{parameter: text}`` from the ``Args:`` section of a component's docstring (Google
    style: ``name: text`` lines, continuation lines indented further), so that an editor's
    hover shows what a parameter means, not just its title. A class's parameter that its own
    docstring leaves out is described by the nearest base class that documents it (a parameter
    every subclass shares, such as an operator's ``sigma_y``, is written once, on the base). A
    base without that parameter in its own signature lists it under ``Options (...):`` instead,
    which the API docs show as a note rather than check against the signature."""
    docs: dict[str, str] = {}
    owners = [cls for cls in factory.__mro__ if cls is not object] if inspect.isclass(
        factory) else [factory]
    for owner in owners:
        for name, text in _own_argument_docs(owner.__doc__ or "").items():
            docs.setdefault(name, text)
    return docs


def _own_argument_docs(text: str) -> dict[str, str]:
    doc = inspect.cleandoc(text)
    docs: dict[str, str] = {}
    inside, current, indent = False, None, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:") or stripped.startswith("Options ("):
            inside, current, indent = True, None, None
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent or (depth == indent and stripped.endswith(":") and " " not in
                              stripped):
            inside = False  # the next section
            continue
        match = re.match(r"^(\w+)(?: \([^)]*\))?: (.*)$", stripped)
        if depth == indent and match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] += " " + stripped
    return docs


def _component_schema(component: Component) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = component.params.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    properties = {
        "kind": {"const": component.name, "description": component.summary},
        **schema.get("properties", {}),
    }
    for pname, text in argument_docs(component.factory).items():
        if pname in properties and "description" not in properties[pname]:
            properties[pname] = {**properties[pname], "description": text}
    for pname, sub in component.nested.items():
        ref: dict[str, Any] = {"$ref": f"#/$defs/{sub.kind}"}
        if sub.many:
            ref = {"type": "array", "items": ref}
        if sub.optional:
            ref = {"anyOf": [ref, {"type": "null"}]}
        properties[pname] = {**ref, "description": f"a nested {sub.kind} component"}
    out = {
        "type": "object",
        "title": f"{component.kind}: {component.name}",
        "description": component.summary,
        "properties": properties,
        "required": ["kind", *schema.get("required", [])],
        "additionalProperties": False,
    }
    return out, defs


def _section_schema(model: type[Section], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        defs.setdefault(name, sub)
    properties = schema.get("properties", {})
    for name, info in model.model_fields.items():
        marker = next((m for m in info.metadata if isinstance(m, ComponentOf)), None)
        annotation = info.annotation
        if marker is not None:
            kind = KIND_ALIASES.get(marker.kind, marker.kind)  # $defs has the current names
            ref: dict[str, Any] = {"$ref": f"#/$defs/{kind}"}
            properties[name] = {"type": "array", "items": ref} if marker.many else ref
        elif (section := section_model(annotation)) is not None:
            defs[section.__name__] = _section_schema(section, defs)
            ref = {"$ref": f"#/$defs/{section.__name__}"}
            properties[name] = ref if section is annotation else {"anyOf": [ref,
                                                                            {"type": "null"}]}
    return schema


def spec_schema(registry: Registry, sources: set[str] | None = None,
                problems: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 7) of a spec file for the components in ``registry``.

    ``sources`` keeps only components from those distributions (``None``: all of them). A
    component whose parameters cannot be written as JSON Schema (an annotation pydantic cannot
    express) is left out with a line in ``problems``: one plugin's annotation must not cost
    everybody the schema.
    """
    defs: dict[str, Any] = {}
    for kind in sorted(registry.kinds.values(), key=lambda k: k.name):
        options = []
        for component in registry.components(kind.name):
            if sources is not None and component.source not in sources:
                continue
            try:
                schema, sub_defs = _component_schema(component)
            except Exception as exc:  # pydantic's schema errors have no common base
                if problems is not None:
                    problems.append(f"{kind.name} {component.name!r} from {component.source}: "
                                    f"left out ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0]})")
                continue
            options.append(schema)
            defs.update(sub_defs)
        defs[kind.name] = {"description": kind.doc.splitlines()[0] if kind.doc else kind.name,
                           "oneOf": options} if options else {"not": {}}
    root = _section_schema(Spec, defs)
    root = copy.deepcopy(root)
    root["$schema"] = SCHEMA_DIALECT
    root["title"] = "diffusers_kit spec"
    root["$defs"] = dict(sorted(defs.items()))
    return root

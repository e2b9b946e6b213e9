"""mkdocs hook: fills ``<!-- dkit:components -->`` with tables generated from the live registry.

The spec reference therefore always lists exactly the components that are registered, with
the parameters, types, defaults and constraints derived from their constructors.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- dkit:components -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def components_markdown() -> str:
    from pydantic_core import PydanticUndefined

    from diffusers_kit.cli.plugins import _constraints, _type_name
    from diffusers_kit.registry import get_registry

    registry = get_registry()
    out: list[str] = []
    for kind in sorted(registry.kinds.values(), key=lambda k: k.name):
        out.append(f"### Kind `{kind.name}`\n\n{kind.doc}\n")
        for component in registry.components(kind.name):
            if component.source != "diffusers_kit":
                continue
            out.append(f"#### `{kind.name}: {component.name}`\n\n{component.summary}\n")
            rows = ["| parameter | type | default | constraints |", "|---|---|---|---|"]
            for name, info in component.params.model_fields.items():
                if name in component.nested:
                    nested = component.nested[name]
                    rows.append(f"| `{name}` | {nested.kind} component | | |")
                    continue
                default = ("required" if info.default is PydanticUndefined
                           else f"`{info.default!r}`")
                rows.append(f"| `{name}` | `{_cell(_type_name(info.annotation))}` | "
                            f"{_cell(default)} | {_cell(_constraints(info))} |")
            if len(rows) == 2:
                rows.append("| *(no parameters)* | | | |")
            out.append("\n".join(rows) + "\n")
            if component.context:
                out.append(f"Set by the run graph: {', '.join(component.context)}.\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, components_markdown())
    return markdown

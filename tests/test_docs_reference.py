"""The spec reference is generated from the code and complete: every field of every spec section
and every parameter of every built-in component reaches docs/spec-reference.md with its meaning,
so a field added without docs fails here rather than going missing from the page."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from diffusers_kit.registry import get_registry
from diffusers_kit.spec import models

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SECTIONS = {"train": models.TrainSection, "sample": models.SampleSection,
            "restore": models.RestoreSection, "evaluate": models.EvaluateSection,
            "output": models.OutputSection}


def _load_hooks():
    spec = importlib.util.spec_from_file_location("dkit_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


@pytest.fixture(scope="module")
def page() -> str:
    return hooks.reference_markdown((DOCS / "spec-reference.md").read_text(encoding="utf-8"))


def blocks(markdown: str, level: str) -> dict[str, str]:
    """The text under each heading of ``level`` (``"##"``), keyed by the heading."""
    out: dict[str, str] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith(level + " "):
            current = line[len(level) + 1:].strip()
            out[current] = ""
        elif current is not None:
            if re.match(rf"#{{1,{len(level)}}} ", line):
                current = None
            else:
                out[current] += line + "\n"
    return out


def row(text: str, name: str) -> str:
    """The table row of field / parameter ``name`` in ``text``."""
    rows = [line for line in text.splitlines()
            if re.match(rf"\| (\[)?`{re.escape(name)}`", line)]
    assert len(rows) == 1, f"{name!r}: {len(rows)} rows in\n{text}"
    return rows[0]


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_every_marker_is_filled(page):
    assert "<!-- dkit:" not in page


def test_the_top_level_table_lists_every_spec_field_with_its_meaning(page):
    top = page[:page.index("## ")]
    for name, info in models.Spec.model_fields.items():
        line = row(top, name)
        meaning = cells(line)[4]
        assert meaning, f"spec field {name!r} has no meaning on the page"
        if info.description:
            assert hooks._cell(" ".join(info.description.split())) == meaning


def test_every_section_model_has_its_table(page):
    assert {name for name, _ in hooks.section_models()} == set(SECTIONS), (
        "a spec section model was added or removed: update SECTIONS here")
    under = blocks(page, "##")
    for name, model in SECTIONS.items():
        text = under[f"`{name}`"]
        for field, info in model.model_fields.items():
            line = row(text, field)
            field_type, default, meaning = cells(line)[1], cells(line)[2], cells(line)[4]
            assert field_type and default, line
            assert meaning, f"{name}.{field} has no meaning on the page"
            if info.description:
                assert hooks._cell(" ".join(info.description.split())) == meaning


def test_literal_choices_defaults_and_bounds_are_readable(page):
    train = blocks(page, "##")["`train`"]
    assert "one of 'constant', 'cosine'" in row(train, "lr_schedule")
    assert "`{kind: adam, lr: 0.001}`" in row(train, "optimizer")
    assert ">= 0, <= 1000000000" in row(train, "steps")
    sample = blocks(page, "##")["`sample`"]
    assert "`solver` component" in row(sample, "solver")
    assert "required" in row(sample, "solver")
    assert "list of `guidance` components" in row(sample, "guidance")
    assert "`int or none`" in row(sample, "batch_size")
    assert "&lt;root>" in row(blocks(page, "##")["`output`"], "root")  # not an HTML tag


def test_every_builtin_parameter_is_listed_with_its_description(page):
    registry = get_registry()
    under = blocks(page, "####")
    described = 0
    for kind in registry.kinds.values():
        for component in registry.components(kind.name):
            if component.source != "diffusers_kit":
                continue
            text = under[f"`{kind.name}: {component.name}`"]
            for name, info in component.params.model_fields.items():
                line = row(text, name)
                meaning = cells(line)[4]
                expected = hooks.parameter_meaning(component, name)
                if info.description:
                    assert " ".join(info.description.split()) == expected
                assert hooks._cell(expected) == meaning, line
                described += bool(meaning)
    assert described > 250  # the docstrings' Args: reach the page


def test_docstring_args_are_parsed():
    doc = """Title.

    Args:
        steps: number of steps
            (continued).
        spacing (str): ``uniform`` or ``edm``.

    Returns:
        nothing: not an argument.
    """
    import inspect

    assert hooks.args_descriptions(inspect.cleandoc(doc)) == {
        "steps": "number of steps (continued).", "spacing": "``uniform`` or ``edm``."}


def test_fallback_meanings_are_only_for_fields_without_a_description():
    owners = {"Spec": models.Spec, **{m.__name__: m for m in SECTIONS.values()}}
    for (owner, name), _ in hooks.FALLBACK_MEANINGS.items():
        info = owners[owner].model_fields.get(name)
        assert info is not None, f"{owner}.{name} no longer exists: drop its fallback meaning"
        assert not info.description, (f"{owner}.{name} now has a description: drop its entry "
                                      "in docs/hooks.py FALLBACK_MEANINGS")


def test_the_annotated_spec_page_includes_a_real_spec_with_every_line_commented():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    assert any("annotated-spec.md" in entry.values() for entry in nav)
    text = (DOCS / "annotated-spec.md").read_text(encoding="utf-8")
    included = re.findall(r'--8<-- "([^"]+)"', text)
    assert included, "the annotated spec must be included from the real file"
    for path in included:
        spec = ROOT / path
        assert spec.is_file(), path
        for number, line in enumerate(spec.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path}:{number} has no comment: {line!r}"
        top_level = yaml.safe_load(spec.read_text(encoding="utf-8"))
        for section in top_level:
            assert f"`{section}`" in text, f"the page does not discuss {section!r}"

"""The emitted JSON Schema covers every component and accepts every shipped spec."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from diffusers_kit.registry import get_registry
from diffusers_kit.spec.schema import spec_schema
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + sorted(
    (ROOT / "plugins").glob("*/specs/*.yaml")
)


@pytest.fixture(scope="module")
def schema():
    return spec_schema(get_registry())


def test_schema_is_valid_draft7(schema):
    jsonschema.Draft7Validator.check_schema(schema)


def test_schema_lists_every_registered_component(schema):
    registry = get_registry()
    for kind in registry.kinds:
        names = {option["properties"]["kind"]["const"] for option in schema["$defs"][kind]["oneOf"]}
        assert names == set(registry.kinds[kind].components)


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_matches_the_schema(schema, path):
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema="), "editors need the schema line"
    jsonschema.validate(yaml.safe_load(text), schema)


def test_schema_rejects_what_the_validator_rejects(schema):
    spec = yaml.safe_load((ROOT / "specs" / "ncsn_ve.yaml").read_text())
    spec["process"]["sigma_maks"] = 3.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, schema)
    spec = yaml.safe_load((ROOT / "specs" / "ncsn_ve.yaml").read_text())
    spec["sample"]["solver"]["steps_per_level"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, schema)


def test_committed_schema_covers_the_builtin_components():
    """specs/dkit.schema.json (what editors load) knows every built-in component."""
    committed = json.loads((ROOT / "specs" / "dkit.schema.json").read_text())
    registry = get_registry()
    for kind in registry.kinds:
        names = {o["properties"]["kind"]["const"] for o in committed["$defs"][kind]["oneOf"]}
        builtin = {c.name for c in registry.components(kind) if c.source == "diffusers_kit"}
        assert builtin <= names, f"regenerate with: dkit schema -o specs/dkit.schema.json ({kind})"


def test_cli_schema_prints_json(capsys):
    code, out, _ = run_cli(["schema"], capsys)
    assert code == 0
    assert json.loads(out)["title"] == "diffusers_kit spec"


def test_parameter_docs_reach_the_schema_description():
    """An editor's hover shows what a parameter means (the docstring's Args:), not a title."""
    schema = spec_schema(get_registry())
    ve = next(o for o in schema["$defs"]["process"]["oneOf"]
              if o["properties"]["kind"]["const"] == "ve")
    assert "largest noise level" in ve["properties"]["sigma_max"]["description"]
    cfg = next(o for o in schema["$defs"]["guidance"]["oneOf"]
               if o["properties"]["kind"]["const"] == "classifier_free")
    assert "guidance weight" in cfg["properties"]["scale"]["description"]


@pytest.fixture
def fresh_registry():
    from diffusers_kit import registry as registry_module

    registry_module.reset_registry()
    yield
    registry_module.reset_registry()


def test_one_unschemable_component_does_not_cost_everybody_the_schema(fresh_registry):
    """A plugin parameter pydantic cannot write as JSON Schema leaves that component out, with
    a warning naming it; every other component is still in the schema."""
    from diffusers_kit.metrics.base import Metric

    class Odd(Metric):
        def __init__(self, hook: Callable[[int], int] | None = None) -> None:
            self.hook = hook

    registry = get_registry()
    registry.add("metric", "odd", Odd)
    problems: list[str] = []
    schema = spec_schema(registry, problems=problems)
    names = {o["properties"]["kind"]["const"] for o in schema["$defs"]["metric"]["oneOf"]}
    assert "odd" not in names and "swd" in names
    assert problems and "'odd'" in problems[0]


def test_a_parameter_documented_on_the_base_class_reaches_every_subclass():
    """Operators document sigma_y, noise and photons once, on ForwardModel: each operator's
    schema still describes them, and a subclass's own text wins over the base's."""
    from diffusers_kit.spec.schema import argument_docs

    schema = spec_schema(get_registry())
    operators = {o["properties"]["kind"]["const"]: o["properties"]
                 for o in schema["$defs"]["forward_model"]["oneOf"]}
    for name in ("blur", "inpaint", "super_resolution", "colorize", "denoise", "matrix"):
        assert "measurement noise standard deviation" in operators[name]["sigma_y"]["description"]
        assert "Poisson" in operators[name]["photons"]["description"]

    class Base:
        """Args:
            a: the base's a.
            b: the base's b.
        """

    class Child(Base):
        """Args:
            a: the child's a.
        """

    assert argument_docs(Child) == {"a": "the child's a.", "b": "the base's b."}

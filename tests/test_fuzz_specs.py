"""Fuzz (issue 14): random mutations of every shipped spec — values, types, keys, YAML text,
overrides — make `dkit validate --build` (validation plus a construction-only build: data
loaded, components built, nothing trained) end in success or exit status 2 with a field path,
never an exception. Bounded for CI: a few examples per spec, no training."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_kit.cli.main import main

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.sampled_from(["kind", "x", "steps"]), st.integers(-3, 3), max_size=2),
    st.sampled_from([".inf", "-.inf", ".nan", "1e400", "~", "..", "cuda:99999", "mps", 10**30,
                     "0x10", "", "{kind: vee}", "a" * 300, -1, 0, 2**63, "true"]),
)
TEXT_BITS = st.sampled_from(["{", "}", "[", "]", ":", "- ", "&a ", "*a", "*undefined",
                             "!!python/object/apply:os.system ['true']", "\t", "\n  ", "'", '"',
                             "#", "%YAML 9.9\n", "@", "\x00", "\ufeff", "? ", "<<: *a\n",
                             "!!binary x", "\n---\n", "|\n"])


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def set_at(data: Any, path: tuple, value: Any, delete: bool = False) -> None:
    for part in path[:-1]:
        data = data[part]
    if delete:
        del data[path[-1]]
    else:
        data[path[-1]] = value


@st.composite
def mutated(draw: st.DrawFn, text: str) -> tuple[str, list[str]]:
    """(spec text, overrides): one to three mutations of one of five sorts."""
    data = yaml.safe_load(text)
    places = paths(data)
    overrides: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        sort = draw(st.sampled_from(["value", "delete", "rename", "text", "override"]))
        place = draw(st.sampled_from(places))
        if sort == "value":
            set_at(data, place, draw(NASTY))
        elif sort in ("delete", "rename") and isinstance(place[-1], str):
            parent = data
            for part in place[:-1]:
                parent = parent[part]
            if not isinstance(parent, dict) or place[-1] not in parent:
                continue
            value = parent.pop(place[-1])
            if sort == "rename":
                parent[draw(st.sampled_from([place[-1] + "s", place[-1][:-1] or "k", "kind",
                                             "extra", "model"]))] = value
        elif sort == "override":
            key = ".".join(str(p) for p in place)
            raw = yaml.safe_dump(draw(NASTY), default_flow_style=True).strip()
            raw = raw.removesuffix("\n...").removesuffix("...").strip()
            overrides.append(draw(st.sampled_from([f"{key}={raw}", f"{key}.x={raw}",
                                                   f"{key}", f"={raw}", f"{key}..x=1"])))
        places = paths(data) or places
    out = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if draw(st.booleans()):  # and damage the YAML text itself
        lines = out.splitlines(keepends=True)
        at = draw(st.integers(0, len(lines)))
        edit = draw(st.sampled_from(["insert", "delete", "duplicate", "indent"]))
        if edit == "insert":
            column = draw(st.integers(0, 8))
            line = lines[at] if at < len(lines) else ""
            lines[at:at + 1] = [line[:column] + draw(TEXT_BITS) + line[column:]]
        elif edit == "delete" and at < len(lines):
            del lines[at]
        elif edit == "duplicate" and at < len(lines):
            lines.insert(at, lines[at])
        elif at < len(lines):
            lines[at] = "   " + lines[at]
        out = "".join(lines)
    return out, overrides


def validate_and_build(text: str, overrides: list[str]) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        for sibling in SPECS:  # references to sibling specs resolve as next to the original
            (Path(folder) / sibling.name).write_text(sibling.read_text(encoding="utf-8"),
                                                     encoding="utf-8")
        path = Path(folder) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["validate", "--build", str(path), *overrides])
        assert not any(Path(folder).glob("runs*")), "validate writes nothing"
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_mutated_shipped_specs_validate_or_exit_2_with_a_field(spec: Path) -> None:
    text = spec.read_text(encoding="utf-8")
    assert validate_and_build(text, [])[0] == 0, "the shipped spec itself is valid"

    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(text))
    def check(case: tuple[str, list[str]]) -> None:
        code, output = validate_and_build(*case)
        assert "Traceback" not in output, output
        assert code in (0, 2), output
        if code == 2:
            flat = " ".join(output.split())
            assert "problem(s)" in flat or "error: dkit" in flat, flat
            assert "expected" in flat or "usage" in flat or "dkit validate" in flat, flat

    check()

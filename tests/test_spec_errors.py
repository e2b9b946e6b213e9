"""Broken specs: each gives exit status 2, the field path and YAML line, and no run folder."""

from __future__ import annotations

import re

import pytest

from tests.helpers import TINY_SPEC, run_cli, write_spec


def broken(old: str, new: str) -> str:
    assert old in TINY_SPEC, old
    return TINY_SPEC.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


CASES = [
    # (id, spec text, extra CLI args, expected field path, line needle or None, extra phrase)
    ("unknown-kind", broken("kind: ve", "kind: vee"), [], "process.kind", "kind: vee",
     "did you mean 've'"),
    ("misspelled-key", broken("sigma_max: 8.0", "sigma_maks: 8.0"), [], "process.sigma_maks",
     "sigma_maks", "did you mean 'sigma_max'"),
    ("wrong-type", broken("steps: 6", "steps: many"), [], "train.steps", "steps: many",
     "valid integer"),
    ("out-of-range", broken("sigma_min: 0.01", "sigma_min: -1"), [], "process.sigma_min",
     "sigma_min: -1", "greater than 0"),
    ("malformed-yaml", broken("network: {kind: ncsn, channels: 8, blocks: 1}",
                              "network: {kind: ncsn, channels: 8"), [], "<spec>",
     None, "well-formed YAML"),
    ("unsafe-tag", broken("name: tiny", "name: !!python/object/apply:os.system ['touch pwned']"),
     [], "<spec>", "python/object", "refused"),
    ("bad-override", TINY_SPEC, ["train.steps=lots"], "train.steps", None,
     "command line 'train.steps=lots'"),
    ("override-without-equals", TINY_SPEC, ["train.steps"], "train.steps", None,
     "command line 'train.steps'"),
    ("missing-section", broken("process:\n  kind: ve\n  sigma_min: 0.01\n  sigma_max: 8.0\n"
                               "  num_levels: 4\n", ""), [], "process", None,
     "required"),
    ("nested-component-param", broken("epsilon: 5.0e-5", "epsilon: -5.0e-5"), [],
     "sample.solver.epsilon", "epsilon: -5.0e-5", "greater than 0"),
    ("nested-component-kind", broken("{kind: adam, lr: 0.001}", "{kind: adamm, lr: 0.001}"), [],
     "train.optimizer.kind", "kind: adamm", "did you mean 'adam'"),
    ("constructor-check", broken("sigma_max: 8.0", "sigma_max: 0.001"), [], "process",
     "process:", "must exceed sigma_min"),
    ("duplicate-key", broken("seed: 3", "seed: 3\nseed: 4"), [], "seed", "seed: 4",
     "each key once"),
    ("bad-device-pattern", broken("device: cpu", "device: gpu"), [], "device", "device: gpu",
     "pattern"),
    ("unknown-top-level", broken("seed: 3", "seeds: 3"), [], "seeds", "seeds: 3",
     "did you mean 'seed'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_spec_exits_2_with_path_and_line(case, tmp_path, capsys):
    _, text, extra, field, needle, phrase = case
    path = write_spec(tmp_path, text)
    code, out, err = run_cli(["run", str(path), *extra], capsys)
    assert code == 2, err
    flat = " ".join(err.split())
    assert f" {field}:" in flat or f" {field} " in flat, flat
    if needle is not None:
        written = path.read_text()
        assert f"{path}:{line_of(written, needle)}" in flat, flat
    elif "command line" in phrase:
        assert "field.path=value" in flat or "expected" in flat
    else:
        assert re.search(rf"{re.escape(str(path))}:\d+", flat) or "required" in flat, flat
    assert phrase in flat, flat
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists(), "a broken spec must not leave a run folder"


def test_unsafe_tag_is_never_executed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, broken("name: tiny",
                                       "name: !!python/object/apply:os.system ['touch pwned']"))
    code, _, _ = run_cli(["validate", str(path)], capsys)
    assert code == 2
    assert not (tmp_path / "pwned").exists()


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert "an existing spec file" in " ".join(err.split())


def test_all_problems_are_reported_at_once(tmp_path, capsys):
    text = broken("sigma_min: 0.01", "sigma_min: -1").replace("steps: 6", "steps: -6")
    text = text.replace("kind: annealed_langevin", "kind: anealed_langevin")
    code, _, err = run_cli(["validate", str(write_spec(tmp_path, text))], capsys)
    flat = " ".join(err.split())
    assert code == 2
    assert "3 problem(s)" in flat
    for field in ("process.sigma_min", "train.steps", "sample.solver.kind"):
        assert field in flat


def test_override_with_unknown_field_names_the_command_line(tmp_path, capsys):
    code, _, err = run_cli(["validate", str(write_spec(tmp_path)), "train.stepz=10"], capsys)
    flat = " ".join(err.split())
    assert code == 2
    assert "train.stepz" in flat and "command line 'train.stepz=10'" in flat
    assert "did you mean 'steps'" in flat


def test_valid_spec_and_overrides_validate(tmp_path, capsys):
    code, out, err = run_cli(
        ["validate", str(write_spec(tmp_path)), "train.steps=100", "sample.n=16", "device=cpu"],
        capsys,
    )
    assert code == 0, err
    assert "valid" in out


def test_override_values_are_typed(tmp_path):
    from diffusers_kit.spec import load_spec

    spec, document = load_spec(write_spec(tmp_path),
                               ["train.steps=100", "sample.solver.denoise=false",
                                "process.sigma_max=12"])
    assert spec.train.steps == 100
    assert spec.sample.solver["denoise"] is False
    assert spec.process["sigma_max"] == 12
    assert document.locate(("train", "steps")) == (None, "command line 'train.steps=100'")

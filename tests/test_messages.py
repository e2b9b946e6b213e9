"""Messages a newcomer meets say what happened and what to do: nothing silent, no raw regex."""

from __future__ import annotations

import json
import os

import pytest

from diffusers_kit import AnnealedLangevin, SampleResult
from diffusers_kit.graph import parse_only
from diffusers_kit.pipeline import run_folders
from diffusers_kit.spec.errors import SpecError
from tests.helpers import run_cli, write_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    from diffusers_kit.cli.main import main

    assert main(["run", str(write_spec(tmp)), "--quiet"]) == 0
    return run_folders(tmp / "runs", "tiny")[0]


def flat(text: str) -> str:
    return " ".join(text.split())


def test_progressive_with_annealed_langevin_says_what_it_shows(trained, capsys):
    before = set((trained / "sampling").glob("*"))
    code, _, err = run_cli(["sample", str(trained), "--n", "4", "--progressive"], capsys)
    assert code == 0, err
    (folder,) = set((trained / "sampling").iterdir()) - before
    assert (folder / "progressive.png").is_file()
    assert json.loads((folder / "sampling.json").read_text())["progressive"] == "x"
    assert "annealed_langevin predicts no x0_hat" in flat(err), err


def test_progressive_with_a_solver_that_records_nothing_says_so(trained, capsys, monkeypatch,
                                                              tmp_path):
    original = AnnealedLangevin.sample

    def silent(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        return SampleResult(result.samples, result.nfe)

    monkeypatch.setattr(AnnealedLangevin, "sample", silent)
    before = set((trained / "sampling").glob("*"))
    code, _, err = run_cli(["sample", str(trained), "--n", "4", "--progressive",
                            "--solver", "{kind: annealed_langevin, steps_per_level: 1}"], capsys)
    assert code == 0, err
    assert "no progressive.png was written" in flat(err), err
    (folder,) = set((trained / "sampling").iterdir()) - before
    assert not (folder / "progressive.png").exists()


@pytest.mark.parametrize("device", ["gpu", "gpu:0", "cuda:99999"])
def test_a_wrong_device_names_the_allowed_values_not_a_regex(tmp_path, capsys, device):
    code, _, err = run_cli(["validate", str(write_spec(tmp_path)), f"device={device}"], capsys)
    assert code == 2
    text = flat(err)
    assert "auto, cpu, cuda, cuda:<index>" in text and "mps" in text, text
    assert "^(" not in text and "\\d" not in text, text


def test_a_misspelled_stage_gets_a_suggestion(tmp_path, capsys):
    code, _, err = run_cli(["run", str(write_spec(tmp_path)), "--only", "sampel,evaluate"],
                           capsys)
    assert code == 2
    assert "did you mean 'sample'?" in flat(err), err
    with pytest.raises(SpecError) as info:
        parse_only("train,sampel,evalute")
    assert info.value.issues[0].suggestions == ["evaluate", "sample"]  # as given: sorted
    with pytest.raises(SpecError) as info:
        parse_only("zzz")
    assert info.value.issues[0].suggestions == []


def test_a_relative_from_says_it_is_relative_to_the_working_directory(tmp_path, capsys,
                                                                       monkeypatch):
    spec = write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", str(spec), "--only", "sample", "--from", "runs/nope"], capsys)
    assert code == 2
    assert f"relative to the working directory {os.getcwd()}" in flat(err), err
    code, _, err = run_cli(["run", str(spec), "--only", "sample", "--from",
                            str(tmp_path / "nope")], capsys)
    assert code == 2
    assert "relative to the working directory" not in flat(err), err

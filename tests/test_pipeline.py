"""Runs that compose: model references, content-addressed reuse, run records, `dkit runs`.

Everything runs on toy 2-D data with networks of a few hundred parameters and tens of steps, so
each `dkit run` takes a second or two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusers_kit import Diffusion
from diffusers_kit.pipeline import (
    LATEST,
    ModelRef,
    TrainedModel,
    follow_latest,
    read_record,
    run_folders,
)
from tests.helpers import child_env, run_cli

ROOT = Path(__file__).resolve().parents[1]

CLASSIFIER = """\
name: clf
seed: 2
device: cpu
data: {{kind: gaussian_mixture, components: 3, n_train: 384, n_heldout: 96}}
process: {{kind: ve, sigma_min: 0.05, sigma_max: 4.0, num_levels: 5}}
network: {{kind: classifier, num_classes: 3, channels: 8}}
objective: {{kind: classification, time: 0.0}}
train: {{steps: {steps}, batch_size: 32, log_every: 5}}
"""

DIFFUSION = """\
name: dm
seed: 1
device: cpu
data: {{kind: gaussian_mixture, components: 3, n_train: 384, n_heldout: 96}}
process: {{kind: ve, sigma_min: 0.05, sigma_max: 4.0, num_levels: 5}}
network: {{kind: mlp, width: 16, blocks: 1}}
objective: {{kind: dsm}}
train: {{steps: {steps}, batch_size: 32, log_every: 5}}
sample:
  n: 16
  solver: {{kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-3}}
evaluate:
  metrics: [{{kind: swd, projections: 16}}]
"""

SAMPLING = """\
name: samp
seed: 5
device: cpu
model: {model}
sample:
  n: 24
  solver: {{kind: annealed_langevin, steps_per_level: 3, epsilon: 1.0e-3}}
evaluate:
  metrics: [{{kind: swd, projections: 16}}]
output: {{root: {root}}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def pipeline(tmp_path: Path, dm_steps: int = 20, model: str = "dm.yaml") -> Path:
    write(tmp_path, "dm.yaml", DIFFUSION.format(steps=dm_steps))
    write(tmp_path, "clf.yaml", CLASSIFIER.format(steps=20))
    return write(tmp_path, "samp.yaml", SAMPLING.format(model=model, root=tmp_path / "runs"))


def runs_of(tmp_path: Path, name: str) -> list[Path]:
    return run_folders(tmp_path / "runs", name)


def test_a_sampling_spec_builds_its_model_once_then_reuses_it(tmp_path, capsys):
    spec = pipeline(tmp_path)
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code == 0, err
    (dm,) = runs_of(tmp_path, "dm")
    (first,) = runs_of(tmp_path, "samp")
    record = read_record(dm)
    assert record["status"] == "finished" and record["trained"] and record["step"] == 20
    assert not (dm / "samples.npz").exists(), "a dependency runs its train stage only"
    metrics = json.loads((first / "metrics.json").read_text())
    (dependency,) = metrics["dependencies"]
    assert dependency["field"] == "model" and dependency["reused"] is False
    assert dependency["hash"] == record["train_hash"] == metrics["train_hash"]
    resolved = yaml.safe_load((first / "spec.yaml").read_text())
    assert resolved["model"] == {"spec": "dm.yaml", "run": str(dm),
                                 "hash": record["train_hash"]}
    stamp = (dm / "checkpoint.safetensors").stat().st_mtime_ns

    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code == 0, err
    assert runs_of(tmp_path, "dm") == [dm], "the model was reused, not trained again"
    assert (dm / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    second = next(p for p in runs_of(tmp_path, "samp") if p != first)
    assert json.loads((second / "metrics.json").read_text())["dependencies"][0]["reused"]
    assert "(reused, hash" in (second / "run.log").read_text()
    with np.load(first / "samples.npz") as a, np.load(second / "samples.npz") as b:
        np.testing.assert_array_equal(a["samples"], b["samples"])
    # the resolved spec of a run is itself runnable: it names the exact model folder
    assert run_cli(["validate", str(second / "spec.yaml")], capsys)[0] == 0


def test_changing_a_dependency_field_retrains_only_that_dependency(tmp_path, capsys):
    spec = pipeline(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    (old,) = runs_of(tmp_path, "dm")
    stamp = (old / "checkpoint.safetensors").stat().st_mtime_ns
    # the same spec with other overrides is another model; the plain one stays reusable
    spec.write_text(spec.read_text().replace(
        "model: dm.yaml", "model: {spec: dm.yaml, overrides: {train.steps: 25}}"))
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    dms = runs_of(tmp_path, "dm")
    assert len(dms) == 2
    new = next(p for p in dms if p != old)
    assert read_record(new)["step"] == 25
    assert read_record(new)["train_hash"] != read_record(old)["train_hash"]
    assert (old / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    # a change outside the training sections (logging cadence) keeps the hash
    spec.write_text(spec.read_text().replace("train.steps: 25", "train.log_every: 7"))
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    assert len(runs_of(tmp_path, "dm")) == 2


def test_rebuild_trains_again_and_latest_points_to_the_newest(tmp_path, capsys):
    spec = pipeline(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    assert run_cli(["run", str(spec), "--quiet", "--rebuild"], capsys)[0] == 0
    dms = runs_of(tmp_path, "dm")
    assert len(dms) == 2
    assert follow_latest(tmp_path / "runs" / "dm" / LATEST).resolve() == dms[-1].resolve()
    samps = runs_of(tmp_path, "samp")
    assert follow_latest(tmp_path / "runs" / "samp" / LATEST).resolve() == samps[-1].resolve()


def test_a_failed_or_interrupted_dependency_is_never_reused(tmp_path, capsys):
    spec = pipeline(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    (dm,) = runs_of(tmp_path, "dm")
    for status in ("interrupted", "failed", "running"):
        record = read_record(dm)
        # stopped during training (a run whose training finished before a later stage failed
        # is reused: tests/test_refuse_early.py)
        record["status"] = status
        record.pop("train_finished", None)
        (dm / "run.json").write_text(json.dumps(record))
        assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
        dms = runs_of(tmp_path, "dm")
        assert len(dms) == 2, status
        for extra in dms[1:]:  # start the next status from a single candidate again
            import shutil

            shutil.rmtree(extra)


def test_the_same_spec_run_again_skips_training_unless_rebuild(tmp_path, capsys):
    spec = write(tmp_path, "dm.yaml", DIFFUSION.format(steps=20)
                 + f"output: {{root: {tmp_path / 'runs'}}}\n")
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    (first,) = runs_of(tmp_path, "dm")
    # only sampling changed: same training hash, the checkpoint is reused (a hard link)
    assert run_cli(["run", str(spec), "--quiet", "sample.n=9"], capsys)[0] == 0
    second = next(p for p in runs_of(tmp_path, "dm") if p != first)
    log = (second / "run.log").read_text()
    assert "train stage skipped" in log and str(first) in log
    assert read_record(second)["checkpoint_from"] == str(first)
    assert not read_record(second)["trained"]
    assert (second / "checkpoint.safetensors").stat().st_ino == (
        first / "checkpoint.safetensors").stat().st_ino
    with np.load(second / "samples.npz") as npz:
        assert npz["samples"].shape == (9, 2)
    # a training field changed: train again
    assert run_cli(["run", str(spec), "--quiet", "train.steps=21"], capsys)[0] == 0
    third = runs_of(tmp_path, "dm")[-1]
    assert read_record(third)["trained"] and read_record(third)["step"] == 21
    assert run_cli(["run", str(spec), "--quiet", "--rebuild"], capsys)[0] == 0
    assert read_record(runs_of(tmp_path, "dm")[-1])["trained"]


def test_a_train_only_classifier_spec_is_referenced_by_run_folder_and_latest(tmp_path, capsys):
    clf = write(tmp_path, "clf.yaml", CLASSIFIER.format(steps=20)
                + f"output: {{root: {tmp_path / 'runs'}}}\n")
    assert run_cli(["run", str(clf), "--quiet"], capsys)[0] == 0
    (folder,) = runs_of(tmp_path, "clf")
    assert read_record(folder)["status"] == "finished"
    for reference in (str(folder), str(tmp_path / "runs" / "clf" / "latest"),
                      {"run": str(folder)}, {"spec": str(clf)}):
        model = TrainedModel.resolve(reference, root=tmp_path / "runs")
        assert model.run_dir is not None and model.run_dir.resolve() == folder.resolve()
        network = model.network()
        assert not network.training
        x = model.data().heldout[:5]
        assert network(x, torch.zeros(5)).shape == (5, 3)
    assert len(runs_of(tmp_path, "clf")) == 1, "resolving the spec reused the finished run"


def test_python_api_from_run_and_from_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "dm.yaml", DIFFUSION.format(steps=20))
    first = Diffusion.from_run("dm.yaml")  # trained under ./runs, the default root
    (folder,) = runs_of(tmp_path, "dm")
    again = Diffusion.from_run("runs/dm/latest")
    for a, b in zip(first.network.parameters(), again.network.parameters(), strict=True):
        assert torch.equal(a, b)
    assert Diffusion.from_run("dm.yaml").step == 20
    assert runs_of(tmp_path, "dm") == [folder]


# -- bad references ---------------------------------------------------------------------------
def test_a_missing_reference_is_a_spec_error_with_field_and_line(tmp_path, capsys):
    spec = pipeline(tmp_path, model="nowhere.yaml")
    code, _, err = run_cli(["run", str(spec)], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert "samp.yaml:4 model: expected an existing spec file" in text
    assert "nowhere.yaml" in text
    assert not (tmp_path / "runs").exists()
    spec = pipeline(tmp_path, model="runs/dm/latest")
    code, _, err = run_cli(["validate", str(spec)], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert "samp.yaml:4 model: expected an existing run folder" in text or "no finished" in text
    spec = pipeline(tmp_path, model="{spec: dm.yaml, colour: red}")
    code, _, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "unknown key(s) ['colour']" in " ".join(err.split())


def test_problems_inside_a_referenced_spec_name_its_own_file_and_line(tmp_path, capsys):
    spec = pipeline(tmp_path)
    (tmp_path / "dm.yaml").write_text(DIFFUSION.format(steps=20).replace(
        "width: 16", "widht: 16"))
    code, _, err = run_cli(["validate", str(spec)], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert "samp.yaml:4 model: expected a valid spec" in text
    assert "dm.yaml:6 network.widht" in text


def test_a_reference_cycle_is_a_spec_error_naming_the_chain(tmp_path, capsys):
    write(tmp_path, "a.yaml", SAMPLING.format(model="b.yaml", root=tmp_path / "runs"))
    write(tmp_path, "b.yaml", SAMPLING.format(model="a.yaml", root=tmp_path / "runs"))
    code, _, err = run_cli(["run", str(tmp_path / "a.yaml")], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert "no reference cycle; the chain is a.yaml -> b.yaml -> a.yaml" in text
    assert not (tmp_path / "runs").exists()


def test_model_sections_are_required_without_model_and_refused_with_it(tmp_path, capsys):
    spec = pipeline(tmp_path)
    spec.write_text(spec.read_text() + "network: {kind: mlp}\n")
    code, _, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "no 'network' section: 'model' names a trained model" in " ".join(
        err.split())
    bare = write(tmp_path, "bare.yaml", "name: bare\nsample: {solver: {kind: ddim}}\n")
    code, _, err = run_cli(["validate", str(bare)], capsys)
    text = " ".join(err.split())
    assert code == 2 and "process: expected a value (this section is required unless" in text


def test_a_corrupt_checkpoint_in_a_referenced_run_is_an_error_never_retrained(tmp_path, capsys):
    spec = pipeline(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    (dm,) = runs_of(tmp_path, "dm")
    checkpoint = dm / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code != 0 and str(checkpoint) in " ".join(err.split())
    assert "Traceback" not in err
    assert runs_of(tmp_path, "dm") == [dm], "never silently retrained over"
    assert len(checkpoint.read_bytes()) == 100, "the user's file is left alone"


# -- concurrency ------------------------------------------------------------------------------
def test_two_concurrent_runs_train_a_missing_dependency_once(tmp_path):
    spec = pipeline(tmp_path, dm_steps=400)  # long enough for the two processes to overlap
    env = child_env()
    command = [sys.executable, "-c", "import sys; from diffusers_kit.cli import main; "
               "sys.exit(main(sys.argv[1:]))", "run", str(spec), "--quiet"]
    children = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    (dm,) = runs_of(tmp_path, "dm")
    assert read_record(dm)["step"] == 400
    samps = runs_of(tmp_path, "samp")
    assert len(samps) == 2
    used = [json.loads((p / "metrics.json").read_text())["dependencies"][0] for p in samps]
    assert {u["run"] for u in used} == {str(dm)}
    assert sorted(u["reused"] for u in used) == [False, True]


# -- dkit runs ---------------------------------------------------------------------------------
def test_runs_lists_status_and_compare_shows_the_differing_fields(tmp_path, capsys):
    spec = write(tmp_path, "dm.yaml", DIFFUSION.format(steps=20)
                 + f"output: {{root: {tmp_path / 'runs'}}}\n")
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    assert run_cli(["run", str(spec), "--quiet", "sample.n=9"], capsys)[0] == 0
    first, second = runs_of(tmp_path, "dm")
    # a run killed with -9 leaves "running" in its record and nobody holding it
    killed = first.with_name(first.name + "-killed")
    killed.mkdir()
    (killed / "run.json").write_text(json.dumps({"name": "dm", "status": "running"}))
    code, out, err = run_cli(["runs", "--root", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if first.name in line]
    assert any("finished" in line for line in lines) and "swd_ratio" in out
    assert any("interrupted" in line for line in lines)
    assert read_record(first)["train_hash"][:12] in out
    code, out, err = run_cli(["runs", "--compare", str(first), str(second)], capsys)
    assert code == 0, err
    assert "sample.n" in out and "16" in out and "9" in out
    assert "swd_ratio" in out
    code, _, err = run_cli(["runs", "nosuch", "--root", str(tmp_path / "runs")], capsys)
    assert code == 2 and "dm" in err


@pytest.mark.parametrize("value, expected", [
    ("runs/x/latest", ModelRef(run="runs/x/latest")),
    ("specs/a.yaml", ModelRef(spec="specs/a.yaml")),
    ({"spec": "a.yaml", "overrides": {"train.steps": 5}},
     ModelRef(spec="a.yaml", overrides=("train.steps=5",))),
    ({"spec": "a.yml", "overrides": ["seed=3"]}, ModelRef(spec="a.yml", overrides=("seed=3",))),
])
def test_reference_forms_parse_and_round_trip(value, expected):
    ref = ModelRef.parse(value)
    assert ref == expected
    assert ModelRef.parse(ref.to_config()) == ref


@pytest.mark.parametrize("value", ["", 3, [], {"overrides": {"a": 1}}, {"run": "x",
                                   "overrides": ["a=1"]}, {"spec": "x.txt"}, {"spec": 5}])
def test_malformed_references_are_refused(value):
    with pytest.raises(ValueError, match="a trained model"):
        ModelRef.parse(value)

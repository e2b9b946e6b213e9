"""What `dkit run` would refuse for a reason visible in the spec, `dkit validate` refuses, and
`dkit run` refuses it before any training; a training that finished survives a later failure.

Toy 2-D data and networks of a few hundred parameters: each run takes a second or two.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.pipeline import read_record, run_folders
from tests.helpers import run_cli

CLASSIFIER = """\
name: clf
seed: 2
device: cpu
data: {kind: gaussian_mixture, components: 3, n_train: 384, n_heldout: 96}
process: {kind: ve, sigma_min: 0.05, sigma_max: 4.0, num_levels: 5}
network: {kind: classifier, num_classes: 3, channels: 8}
objective: {kind: classification, time: 0.0}
train: {steps: 5, batch_size: 32, log_every: 5}
"""

DIFFUSION = """\
name: dm
seed: 1
device: cpu
data: {kind: gaussian_mixture, components: 3, n_train: 384, n_heldout: 96}
process: {kind: ve, sigma_min: 0.05, sigma_max: 4.0, num_levels: 5}
network: {kind: mlp, width: 16, blocks: 1}
objective: {kind: dsm}
train: {steps: 10, batch_size: 32, log_every: 5}
sample:
  n: 16
  solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-3}
evaluate:
  metrics:
    - {kind: swd, projections: 16}
    - {kind: prdc, features: clf.yaml, resamples: 20}
output: {root: ROOT}
"""


def specs(tmp_path: Path) -> Path:
    (tmp_path / "clf.yaml").write_text(CLASSIFIER, encoding="utf-8")
    path = tmp_path / "dm.yaml"
    path.write_text(DIFFUSION.replace("ROOT", str(tmp_path / "runs")), encoding="utf-8")
    return path


@pytest.fixture
def no_training(monkeypatch):  # type: ignore[no-untyped-def]
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a network was trained")

    monkeypatch.setattr(Diffusion, "fit", refuse)


def test_validate_refuses_a_metric_that_sample_n_cannot_feed(tmp_path, capsys, no_training):
    spec = specs(tmp_path)
    code, _, err = run_cli(["validate", str(spec), "sample.n=8"], capsys)
    flat = " ".join(err.split())
    assert code == 2, err
    assert "evaluate.metrics[1]" in flat and "sample.n = 8" in flat and "prdc" in flat
    assert "PRDC with k = 5 needs more than 5 distinct points" in flat
    assert run_folders(tmp_path / "runs") == []


def test_validate_accepts_the_sizes_the_metrics_need(tmp_path, capsys, no_training):
    code, out, err = run_cli(["validate", str(specs(tmp_path))], capsys)
    assert code == 0, err
    assert "is valid" in out


def test_run_refuses_before_training_anything(tmp_path, capsys, no_training):
    spec = specs(tmp_path)
    code, _, err = run_cli(["run", str(spec), "sample.n=8", "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 2, err
    assert "sample.n = 8" in flat and "prdc" in flat
    # neither the classifier the metric refers to nor the model itself was trained
    assert run_folders(tmp_path / "runs") == []


def test_a_metric_of_the_trained_model_is_left_to_the_evaluation(tmp_path, capsys,
                                                                 monkeypatch, no_training):
    """nll judges the trained model on held-out data, not the samples: the size check does
    not integrate an untrained model's likelihood."""
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a likelihood was computed")

    monkeypatch.setattr("diffusers_kit.metrics.nll.log_likelihood", refuse)
    code, out, err = run_cli(["validate", str(specs(tmp_path)),
                              "evaluate.metrics=[{kind: nll, n: 8}, {kind: swd}]"], capsys)
    assert code == 0, err
    assert "is valid" in out


def test_validate_checks_components_against_each_other(tmp_path, capsys, no_training):
    spec = specs(tmp_path)
    code, _, err = run_cli(["validate", str(spec), "objective={kind: reconstruction}"], capsys)
    flat = " ".join(err.split())
    assert code == 2, err
    assert "objective.kind" in flat and "trains a diffusion model" in flat


def test_a_failed_evaluation_leaves_the_training_reusable(tmp_path, capsys, monkeypatch):
    spec = specs(tmp_path)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr("diffusers_kit.run.stages.evaluate_metrics", broken)
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 70, err
    (first,) = run_folders(tmp_path / "runs", "dm")
    record = read_record(first)
    assert record is not None and record["status"] == "failed" and record["train_finished"]
    assert "reuses it" in flat
    assert f"--only sample,evaluate --from {first}" in flat

    monkeypatch.undo()
    trained = []
    fit = Diffusion.fit
    monkeypatch.setattr(Diffusion, "fit", lambda self, *a, **k: trained.append(1) or fit(
        self, *a, **k))
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code == 0, err
    second = [f for f in run_folders(tmp_path / "runs", "dm") if f != first]
    assert len(second) == 1
    record = read_record(second[0])
    assert record is not None and record["status"] == "finished"
    assert record["checkpoint_from"] == str(first)
    assert trained == []  # the model was not trained again


def test_the_components_are_checked_once_when_no_model_is_trained_first(tmp_path, capsys,
                                                                        monkeypatch):
    """The checks with stand-ins happen only when a referenced model must be trained before
    this run; with every referenced model finished, the spec is built and checked once."""
    from diffusers_kit.run import execution

    spec = specs(tmp_path)
    builds: list[str] = []
    build = execution.build_components
    monkeypatch.setattr(execution, "build_components",
                        lambda s, *a, **k: builds.append(s.name) or build(s, *a, **k))
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    # the classifier had to be trained: dm checked with stand-ins, clf built, dm built
    assert builds == ["dm", "clf", "dm"]
    builds.clear()
    assert run_cli(["run", str(spec), "sample.n=24", "--quiet"], capsys)[0] == 0
    assert builds == ["dm"]

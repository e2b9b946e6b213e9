"""Metrics in a run and in `dkit evaluate`: the feature spec is built once and reused, the run
summary and metrics.json carry value / floor / interval / n, and evaluate recomputes metrics on
the saved samples without sampling again. Tiny networks and few steps: seconds per command."""

from __future__ import annotations

import json

from diffusers_kit.pipeline import read_record, run_folders
from tests.helpers import run_cli, write_spec

FEATURES = """\
name: feat
seed: 0
device: cpu
data: {kind: digits}
process: {kind: ve, sigma_min: 0.01, sigma_max: 8.0, num_levels: 4}
network: {kind: classifier, num_classes: 10, channels: 8}
objective: {kind: classification, time: 0.0}
train: {steps: 20, batch_size: 32, log_every: 10}
evaluate:
  metrics: [{kind: accuracy, resamples: 50}]
output: {root: {root}}
"""

MODEL = """\
name: tiny
seed: 3
device: cpu
data: {kind: digits}
process: {kind: ve, sigma_min: 0.01, sigma_max: 8.0, num_levels: 4}
network: {kind: ncsn, channels: 8, blocks: 1}
objective: {kind: dsm}
train: {steps: 6, batch_size: 32, log_every: 3}
sample:
  n: 40
  solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 5.0e-5}
evaluate:
  metrics:
    - {kind: swd, projections: 64, resamples: 20}
    - {kind: fd, features: feat.yaml, resamples: 20}
    - {kind: prdc, features: feat.yaml, resamples: 20}
output: {root: {root}}
"""


def metrics_of(folder) -> dict:
    text = (folder / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def test_a_run_reports_each_metric_with_floor_interval_and_n_then_evaluate_adds_more(
        tmp_path, capsys):
    features = write_spec(tmp_path, FEATURES, "feat.yaml")
    assert run_cli(["run", str(features), "--quiet"], capsys)[0] == 0
    spec = write_spec(tmp_path, MODEL, "tiny.yaml")
    code, out, err = run_cli(["run", str(spec)], capsys)
    assert code == 0, err
    (feat,) = run_folders(tmp_path / "runs", "feat")  # reused by both metrics
    (run,) = run_folders(tmp_path / "runs", "tiny")
    metrics = metrics_of(run)
    for key in ("swd", "fd", "precision", "recall", "density", "coverage"):
        for suffix in ("", "_floor", "_low", "_high", "_floor_low", "_floor_high", "_n"):
            assert isinstance(metrics[f"{key}{suffix}"], float), f"{key}{suffix}"
        assert metrics[f"{key}_n"] == 40
    assert metrics["fd_low"] <= metrics["fd"] <= metrics["fd_high"]
    summary = " ".join(out.split())
    assert f"{metrics['fd']:.4g} [" in summary and "floor" in summary and "n=40" in summary
    assert "metric fd = " in (run / "run.log").read_text()
    assert "accuracy" in metrics_of(feat)  # the train-only spec records its held-out accuracy

    # recompute on the saved samples: a new metric by name (defaults) or as a mapping
    code, out, err = run_cli(["evaluate", str(tmp_path / "runs" / "tiny" / "latest"),
                              "--metrics", "swd", f"{{kind: kid, features: {features}, "
                              "resamples: 20, subsets: 10}"], capsys)
    assert code == 0, err
    # the finished run's files are not changed (issue 29): the figures go to a new folder
    assert metrics_of(run) == metrics and "kid" not in read_record(run)["metrics"]
    (written,) = sorted((run / "evaluation").glob("*/metrics.json"))
    again = json.loads(written.read_text())
    assert again["swd"] == metrics["swd"]  # same samples, same seed, same figure
    assert {"kid", "kid_std", "kid_floor", "kid_low", "kid_high", "kid_n"} <= set(again)
    assert str(written) in " ".join(err.split())
    assert len(run_folders(tmp_path / "runs", "feat")) == 1, "the feature network was reused"
    assert "kid" in out and "floor" in out

    # a train-only run: only metrics that need no samples
    code, out, err = run_cli(["evaluate", str(feat)], capsys)
    assert code == 0, err
    assert "accuracy" in out


def test_evaluate_mistakes_are_spec_errors(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "RUN_DIR" in err
    write_spec(tmp_path, FEATURES, "feat.yaml")
    assert run_cli(["run", str(tmp_path / "feat.yaml"), "--quiet"], capsys)[0] == 0
    (feat,) = run_folders(tmp_path / "runs", "feat")
    code, _, err = run_cli(["evaluate", str(feat), "--metrics", "[1, 2]"], capsys)
    assert code == 2 and "--metrics" in err
    code, _, err = run_cli(["evaluate", str(feat), "--metrics", "fd"], capsys)
    text = " ".join(err.split())
    assert code == 2 and "evaluate.metrics[0].features" in text and "required" in text
    code, _, err = run_cli(["evaluate", str(feat), "--metrics", "swd"], capsys)
    assert code == 2 and "samples to evaluate" in " ".join(err.split())

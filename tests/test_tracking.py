"""Trackers (spec.track): what a run logged, read back with TensorBoard's and MLflow's own
readers."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from diffusers_kit.pipeline import run_folders
from tests.helpers import TINY_SPEC, run_cli, write_spec


def tracked_spec(tmp_path, track: str):
    return write_spec(tmp_path, TINY_SPEC + f"track: {track}\n")


def logged_losses(run_dir):
    """``{step: loss}`` from the run's log (written by the run, not by a tracker)."""
    text = (run_dir / "run.log").read_text()
    return {int(s): float(v) for s, v in re.findall(r"step (\d+) loss ([0-9.eE+-]+)", text)}


def test_tensorboard_event_files_hold_loss_learning_rate_metrics_and_samples(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = run_cli(["run", str(tracked_spec(tmp_path, "[{kind: tensorboard}]")),
                            "--quiet"], capsys)
    assert code == 0, err
    (run_dir,) = run_folders(tmp_path / "runs", "tiny")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [3, 6]
    for step, value in logged_losses(run_dir).items():
        assert losses[step] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx(
        [0.001, 0.001])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("swd", "swd_floor"):
        (event,) = events.Scalars(f"metrics/{name}")
        assert event.value == pytest.approx(metrics[name], rel=1e-6) and event.step == 6
    assert tags["images"] == ["samples"]
    (image,) = events.Images("samples")
    assert (image.width, image.height) == Image.open(run_dir / "samples.png").size


def test_mlflow_run_holds_the_resolved_spec_metrics_and_the_run_folder(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = (tmp_path / "store").as_uri()
    code, _, err = run_cli(["run", str(tracked_spec(
        tmp_path, f"[{{kind: mlflow, tracking_uri: '{store}', experiment: digits}}]")),
        "--quiet"], capsys)
    assert code == 0, err
    (run_dir,) = run_folders(tmp_path / "runs", "tiny")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["train.optimizer.lr"] == "0.001" and params["network.channels"] == "8"
    assert params["evaluate.metrics.0.kind"] == "swd"
    assert params["network.prediction"] == "eps", "the resolved spec: defaults filled in"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    logged = logged_losses(run_dir)
    assert sorted(m.step for m in history) == sorted(logged) == [3, 6]
    for m in history:
        assert m.value == pytest.approx(logged[m.step], rel=1e-5, abs=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["swd"] == pytest.approx(metrics["swd"])
    assert run.data.metrics["swd_floor"] == pytest.approx(metrics["swd_floor"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint.safetensors", "samples.png", "samples.npz", "metrics.json",
            "spec.yaml"} <= artifacts


def test_a_tracker_whose_package_is_missing_is_exit_2_naming_the_extra(tmp_path, capsys,
                                                                       monkeypatch):
    import importlib.util

    from diffusers_kit.tracking import base

    real = importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    spec = tracked_spec(tmp_path, "[{kind: tensorboard}, {kind: mlflow}]")
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert "track[1]" in text and "pip install diffusers_kit[mlflow]" in text
    assert "track[0]" not in text
    assert not (tmp_path / "runs").exists(), "refused before any run folder"


def test_tracker_parameters_are_checked(tmp_path, capsys):
    spec = tracked_spec(tmp_path, "[{kind: tensorboard, folder: ../elsewhere}]")
    code, _, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "track" in err and "subfolder" in " ".join(err.split())
    spec = tracked_spec(tmp_path, "[{kind: wandb}]")
    code, _, err = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "tensorboard" in err

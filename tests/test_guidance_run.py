"""Guidance through the spec and the CLI: class-conditional training, sample.labels and
sample.guidance, dkit sample --guidance / --labels, classifier references, and clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_kit.data.toy2d import GaussianMixture
from tests.helpers import run_cli, write_spec

DATA = "{kind: gaussian_mixture, components: 4, radius: 2.0, std: 0.15, n_train: 4000}"

CONDITIONAL = f"""\
name: cond
seed: 0
device: cpu
data: {DATA}
process: {{kind: vp}}
network: {{kind: mlp, width: 64, blocks: 2, prediction: v, num_classes: 4, class_dropout: 0.2}}
objective: {{kind: dsm}}
train: {{steps: 600, batch_size: 256, log_every: 200, optimizer: {{kind: adam, lr: 0.003}}}}
sample:
  n: 200
  labels: all
  guidance:
    - {{kind: classifier_free, scale: 2.0}}
  solver: {{kind: dpm_solver_2m, steps: 20}}
evaluate:
  metrics:
    - {{kind: swd, projections: 64}}
output: {{root: {{root}}}}
"""

UNCONDITIONAL = CONDITIONAL.replace("name: cond", "name: uncond").replace(
    ", num_classes: 4, class_dropout: 0.2", "")

CLASSIFIER = f"""\
name: clf
seed: 0
device: cpu
data: {DATA}
process: {{kind: {{process}}}}
network: {{kind: classifier, num_classes: 4, channels: 32}}
objective: {{kind: classification, times: uniform}}
train: {{steps: 1000, batch_size: 256, log_every: 500, optimizer: {{kind: adam, lr: 0.003}}}}
evaluate: {{metrics: [{{kind: accuracy}}]}}
output: {{root: {{root}}}}
"""

GUIDED = """\
name: guided
seed: 0
device: cpu
model: uncond.yaml
sample:
  n: 200
  labels: all
  guidance:
    - {kind: classifier, classifier: clf.yaml, scale: 4.0}
  solver: {kind: dpm_solver_2m, steps: 20}
evaluate:
  metrics:
    - {kind: swd, projections: 64}
output: {root: {root}}
"""


def nearest_component(samples: torch.Tensor) -> torch.Tensor:
    means = GaussianMixture(components=4, radius=2.0).means()
    return torch.cdist(samples.float(), means).argmin(1)


def latest(tmp_path: Path, name: str) -> Path:
    return sorted(p for p in (tmp_path / "runs" / name).iterdir() if p.name != "latest")[-1]


def load(folder: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    with np.load(folder / "samples.npz") as npz:
        labels = torch.from_numpy(npz["labels"]) if "labels" in npz.files else None
        return torch.from_numpy(npz["samples"]), labels


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from diffusers_kit.cli.main import main

    tmp = tmp_path_factory.mktemp("guidance")
    assert main(["run", str(write_spec(tmp, CONDITIONAL)), "--quiet"]) == 0
    return latest(tmp, "cond")


def test_class_conditional_training_and_guided_sampling_end_to_end(conditional_run):
    samples, labels = load(conditional_run)
    assert labels is not None and labels.tolist() == [c for c in range(4) for _ in range(50)]
    accuracy = (nearest_component(samples) == labels).double().mean()
    assert accuracy >= 0.95, float(accuracy)  # measured: 1.0
    assert (conditional_run / "samples.png").is_file()
    metrics = json.loads((conditional_run / "metrics.json").read_text())
    assert "labels" not in metrics and metrics["nfe"] == 20  # one batched call per step
    spec = (conditional_run / "spec.yaml").read_text()
    assert "classifier_free" in spec and "labels: all" in spec


def test_dkit_sample_changes_guidance_and_labels_without_training(conditional_run, capsys):
    code, out, _ = run_cli(["sample", str(conditional_run), "--labels", "2", "--n", "40",
                            "--guidance", "{kind: classifier_free, scale: 3}"], capsys)
    assert code == 0, out
    folder = sorted((conditional_run / "sampling").iterdir())[-1]
    samples, labels = load(folder)
    assert labels.tolist() == [2] * 40
    assert (nearest_component(samples) == 2).double().mean() >= 0.95
    info = json.loads((folder / "sampling.json").read_text())
    assert info["guidance"][0]["scale"] == 3 and info["labels"] == 2
    # the same network, unconditionally: its null label covers every component
    code, out, _ = run_cli(["sample", str(conditional_run), "--labels", "none", "--guidance",
                            "none", "--n", "400"], capsys)
    assert code == 0, out
    folder = sorted((conditional_run / "sampling").iterdir())[-1]
    samples, labels = load(folder)
    assert labels is None
    shares = torch.bincount(nearest_component(samples), minlength=4).double() / 400
    assert shares.min() > 0.15, shares.tolist()  # each of 4 equal components near 1/4


def test_tune_times_tunes_the_guided_model_the_spec_samples(conditional_run, capsys):
    code, out, err = run_cli(["tune-times", str(conditional_run), "--n", "40", "--tries", "15",
                              "--reference-steps", "60"], capsys)
    assert code == 0, err
    assert "with the spec's labels (all) and ClassifierFree" in out
    line = out.split("--solver '")[1].split("'")[0]
    assert json.loads(line)["kind"] == "dpm_solver_2m"
    code, out, err = run_cli(["sample", str(conditional_run), "--solver", line, "--n", "8"],
                             capsys)
    assert code == 0, err


@pytest.mark.parametrize(("override", "field", "expected"), [
    ("sample.labels=null", "sample.labels", "the classes to draw for guidance classifier_free"),
    ("sample.labels=[1,7]", "sample.labels", "classes in 0..3"),
    ("sample.guidance=[{kind: clasifier_free}]", "sample.guidance[0].kind", "classifier_free"),
    ("sample.guidance=[{kind: classifier_free, rescale: 2}]", "sample.guidance[0].rescale",
     "less than or equal to 1"),
])
def test_spec_errors_name_the_field(tmp_path, capsys, override, field, expected):
    code, _, err = run_cli(["run", str(write_spec(tmp_path, CONDITIONAL)), override], capsys)
    assert code == 2
    assert field in err and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.npz"))


def test_classifier_free_needs_a_conditional_network(tmp_path, capsys):
    code, _, err = run_cli(["run", str(write_spec(tmp_path, UNCONDITIONAL)), "train.steps=1"],
                           capsys)
    assert code == 2
    assert "sample.guidance[0].kind" in err and "class-conditional network" in err


def test_classifier_guidance_from_referenced_specs(tmp_path, capsys):
    """The unconditional model and the noise-aware classifier are trained by their own specs
    (once), then classifier guidance steers the samples to the requested components."""
    write_spec(tmp_path, UNCONDITIONAL, "uncond.yaml")
    write_spec(tmp_path, CLASSIFIER.replace("{process}", "vp"), "clf.yaml")
    guided = write_spec(tmp_path, GUIDED, "guided.yaml")
    code, _, err = run_cli(["run", str(guided), "--quiet"], capsys)
    assert code == 0, err
    samples, labels = load(latest(tmp_path, "guided"))
    accuracy = (nearest_component(samples) == labels).double().mean()
    assert accuracy >= 0.9, float(accuracy)
    # a classifier trained under another process is refused, naming the field
    write_spec(tmp_path, CLASSIFIER.replace("{process}", "subvp"), "clf.yaml")
    code, _, err = run_cli(["run", str(guided)], capsys)
    assert code == 2
    assert "sample.guidance[0].kind" in err and "same noise process" in err

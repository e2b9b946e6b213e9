"""A run folder written by dkit 0.2 (tests/fixtures/run_0_2: two training steps of a small MLP,
made with the 0.2 code by tests/fixtures/run_0_2/tiny2d.yaml) still loads, resumes and is
reused by content hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.references import TrainedModel
from diffusers_kit.run import open_run
from diffusers_kit.run_folder import read_record, run_folders
from tests.helpers import run_cli

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_0_2"
STAMP = "20261207-060528"
HASH = "dd006b0bb96f74af011b577fcee2e648a27aca0144424c9df2d8ecfcfc151fbc"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A copy of the fixture under ``tmp_path/runs`` (its ``latest`` link kept)."""
    shutil.copytree(FIXTURE / "tiny2d", tmp_path / "runs" / "tiny2d", symlinks=True)
    return tmp_path / "runs"


def no_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    fit = Diffusion.fit
    monkeypatch.setattr(Diffusion, "fit", lambda self, *a, **k: calls.append(1) or fit(
        self, *a, **k))
    return calls


def test_it_loads_with_its_weights(runs: Path) -> None:
    spec, components = open_run(runs / "tiny2d" / "latest")
    assert spec.name == "tiny2d" and components.diffusion.step == 2
    tensors = load_file(runs / "tiny2d" / STAMP / "checkpoint.safetensors")
    network = components.diffusion.network.state_dict()
    assert network.keys() and all(torch.equal(value, tensors[f"network.{key}"])
                                  for key, value in network.items())
    # referenced by a component, it loads through the store with its sampling (EMA) weights
    sampling = TrainedModel(str(runs / "tiny2d" / "latest")).network().state_dict()
    assert all(torch.equal(value, tensors[f"ema.{key}"]) for key, value in sampling.items())


def test_it_is_reused_by_content_hash(runs: Path, capsys, monkeypatch) -> None:
    trained = no_training(monkeypatch)
    code, _, err = run_cli(["run", str(FIXTURE / "tiny2d.yaml"), f"output.root={runs}",
                            "--quiet"], capsys)
    assert code == 0, err
    (new,) = [f for f in run_folders(runs, "tiny2d") if f.name != STAMP]
    record = read_record(new)
    assert record is not None and record["train_hash"] == HASH
    assert record["checkpoint_from"] == str(runs / "tiny2d" / STAMP)
    assert trained == []


def test_it_resumes_for_more_steps(runs: Path, capsys) -> None:
    folder = runs / "tiny2d" / STAMP
    code, _, err = run_cli(["run", str(FIXTURE / "tiny2d.yaml"), f"output.root={runs}",
                            "train.steps=4", "--resume", str(folder), "--quiet"], capsys)
    assert code == 0, err
    # the finished 0.2 run is not changed: the longer training is a new run folder
    assert read_record(folder)["train_hash"] == HASH
    (new,) = [f for f in run_folders(runs, "tiny2d") if f.name != STAMP
              and (read_record(f) or {}).get("resumed_from") == str(folder)]
    record = read_record(new)
    assert record is not None and record["status"] == "finished" and record["step"] == 4
    assert record["train_hash"] != HASH  # four steps are another model

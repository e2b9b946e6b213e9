"""The run graph end to end: files written, sampling again from a checkpoint, hooks, Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from diffusers_kit import (
    NCSN,
    VE,
    Adam,
    AnnealedLangevin,
    DenoisingScoreMatching,
    Diffusion,
    Digits,
    hookimpl,
)
from diffusers_kit.pipeline import run_folders
from diffusers_kit.registry import get_plugin_manager
from tests.helpers import run_cli, write_spec


def only_run(tmp_path):
    runs = run_folders(tmp_path / "runs", "tiny")
    assert len(runs) == 1
    return runs[0]


def test_run_writes_every_artefact(tmp_path, capsys):
    code, out, err = run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)
    assert code == 0, err
    run_dir = only_run(tmp_path)
    for name in ("spec.yaml", "checkpoint.safetensors", "samples.png", "samples.npz",
                 "metrics.json", "run.log"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert resolved["network"] == {"kind": "ncsn", "channels": 8, "blocks": 1, "dropout": 0.0,
                                   "prediction": "eps"}, "defaults are written out in full"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["swd"] > 0 and metrics["swd_floor"] > 0
    assert metrics["nfe"] == 4 * 2 + 1  # levels x steps + the denoising step
    with np.load(run_dir / "samples.npz") as npz:
        assert npz["samples"].shape == (12, 1, 8, 8)
        assert npz["display"].min() >= 0 and npz["display"].max() <= 1
    picture = Image.open(run_dir / "samples.png")
    assert picture.size[0] > 8 * 4 and picture.size[1] > 8 * 3
    log = (run_dir / "run.log").read_text()
    assert "step 6 loss" in log
    assert "swd" in out and str(run_dir) in " ".join(out.split())


def test_sample_again_from_a_checkpoint_without_training(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    first = only_run(tmp_path)
    code, _, err = run_cli(["run", str(spec), "--only", "sample,evaluate", "--from", str(first),
                            "--quiet"], capsys)
    assert code == 0, err
    second = next(p for p in run_folders(tmp_path / "runs", "tiny") if p != first)
    assert not (second / "checkpoint.safetensors").exists(), "no training happened"
    assert "weights loaded from" in (second / "run.log").read_text()
    record = json.loads((second / "run.json").read_text())
    assert Path(record["checkpoint_from"]).resolve() == first.resolve(), "which weights it shows"
    assert record["trained"] is False
    with np.load(first / "samples.npz") as a, np.load(second / "samples.npz") as b:
        np.testing.assert_array_equal(a["samples"], b["samples"])


def test_sampling_only_needs_a_previous_run(tmp_path, capsys):
    code, _, err = run_cli(["run", str(write_spec(tmp_path)), "--only", "sample"], capsys)
    assert code == 2
    assert "--from" in err
    assert not (tmp_path / "runs").exists()


def test_life_cycle_hooks_reach_plugins(tmp_path, capsys):
    seen: dict[str, list] = {"steps": [], "samples": [], "finished": []}

    class Recorder:
        @hookimpl
        def dkit_train_step(self, run, step, loss):
            seen["steps"].append((step, loss))

        @hookimpl
        def dkit_samples_ready(self, run, samples):
            seen["samples"].append(samples.shape)

        @hookimpl
        def dkit_run_finished(self, run, metrics):
            seen["finished"].append(sorted(metrics))

    manager = get_plugin_manager()
    recorder = Recorder()
    manager.register(recorder)
    try:
        assert run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)[0] == 0
    finally:
        manager.unregister(recorder)
    assert [s for s, _ in seen["steps"]] == [3, 6]
    assert seen["samples"] == [torch.Size([12, 1, 8, 8])]
    assert "swd" in seen["finished"][0]


def test_python_api_gives_the_same_samples_as_the_spec(tmp_path, capsys):
    assert run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)[0] == 0
    with np.load(only_run(tmp_path) / "samples.npz") as npz:
        from_spec = torch.from_numpy(npz["samples"])

    torch.manual_seed(3)  # the spec's seed also seeds the network's initial weights
    data = Digits().load()
    model = Diffusion(
        VE(sigma_min=0.01, sigma_max=8.0, num_levels=4),
        NCSN(channels=8, blocks=1, data_shape=data.shape),
        DenoisingScoreMatching(),
        device="cpu",
    )
    model.fit(data, steps=6, batch_size=32, optimizer=Adam(lr=0.001), seed=3, log_every=3)
    result = model.sample(12, AnnealedLangevin(steps_per_level=2, epsilon=5e-5), seed=3)
    torch.testing.assert_close(result.samples, from_spec, rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_the_network_is_a_spec_error(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    first = only_run(tmp_path)
    code, _, err = run_cli(["run", str(spec), "--only", "sample", "--from", str(first),
                            "network.channels=16"], capsys)
    assert code == 2
    assert "--from" in err and "fit this spec's network" in " ".join(err.split())
    assert len(run_folders(tmp_path / "runs", "tiny")) == 1, "no new run folder"

"""A component's model reference loads through the installed store: the leaf module that
components import knows nothing of the run machinery."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_kit import references
from diffusers_kit.references import LoadedModel, TrainedModel, install_store, model_store


class RecordingStore:
    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def resolve(self, model, *, root, rebuild, quiet, console):  # type: ignore[no-untyped-def]
        model.run_dir = root / "built"

    def load(self, run_dir: Path) -> LoadedModel:
        self.loaded.append(run_dir)
        return LoadedModel(spec="the spec", diffusion="the model", data="the data")  # type: ignore[arg-type]


@pytest.fixture
def store():  # type: ignore[no-untyped-def]
    installed = model_store()
    recording = RecordingStore()
    install_store(recording)
    yield recording
    install_store(installed)


def test_a_reference_loads_through_the_installed_store(store, tmp_path):
    model = TrainedModel(str(tmp_path / "runs" / "a" / "latest"))
    model.run_dir = tmp_path / "runs" / "a" / "x"  # planned by spec validation
    assert model.diffusion() == "the model" and model.data() == "the data"
    assert model.diffusion() == "the model"  # loaded once
    assert store.loaded == [tmp_path / "runs" / "a" / "x"]
    resolved = TrainedModel.resolve("specs/b.yaml", root=tmp_path)
    assert resolved.run_dir == tmp_path / "built"


def test_importing_diffusers_kit_installs_the_run_layers_store():
    from diffusers_kit.run.store import RunStore

    assert isinstance(model_store(), RunStore)
    assert references._STORE  # installed once, by the run layer

"""The Python API gives a notebook what the command line gives: every built-in component at the
top level, progress bars, the run's metrics and its files; and sampling that fits in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_kit
from diffusers_kit import (
    DDIM,
    DDPM,
    FD,
    KID,
    NCSN,
    OU,
    PRDC,
    PSNR,
    SSIM,
    SWD,
    VE,
    VP,
    Ancestral,
    AnnealedLangevin,
    ClassAccuracy,
    DenoisingScoreMatching,
    Diffusion,
    Digits,
    DPMSolver2M,
    DPMSolver3M,
    EDMStochastic,
    EulerODE,
    HeunODE,
    ImageFolder,
    Inpaint,
    Langevin,
    NpzArrays,
    Patches,
    PredictorCorrector,
    RePaint,
    SampleResult,
    SamplingOutOfMemory,
    ScipyODE,
    SubVP,
    TwoMoons,
)
from diffusers_kit import diffusion as api_module
from diffusers_kit.builtin import PACKAGES
from diffusers_kit.pipeline import run_folders
from diffusers_kit.restore import restore
from tests.helpers import run_cli, write_spec


# -- exports -------------------------------------------------------------------------------------
def test_every_built_in_component_is_exported_at_the_top_level():
    missing = []
    for package in PACKAGES:
        for kind, name, factory in package.REGISTER:
            if getattr(diffusers_kit, factory.__name__, None) is not factory:
                missing.append(f"{kind} {name} ({factory.__name__})")
    assert not missing, missing
    for name in diffusers_kit.__all__:
        assert hasattr(diffusers_kit, name), name


def test_named_exports_are_the_components_and_functions():
    import diffusers_kit
    from diffusers_kit.metrics import (
        FrechetDistance,
        KernelDistance,
        PrecisionRecall,
        SlicedWasserstein,
    )

    assert (SlicedWasserstein, FrechetDistance, KernelDistance,
                                     PrecisionRecall) == (SWD, FD, KID, PRDC)
    # the module stays reachable as an attribute (a function named restore would hide it)
    assert diffusers_kit.restore.restore is restore and callable(restore)
    for cls in (VP, SubVP, DDPM, OU, Ancestral, DDIM, DPMSolver2M, DPMSolver3M, EulerODE,
                HeunODE, ScipyODE, PredictorCorrector, EDMStochastic, RePaint, Langevin,
                ClassAccuracy, PSNR, SSIM, Patches, ImageFolder, NpzArrays, Inpaint):
        assert isinstance(cls, type), cls
    # the restore module's other names still import from it
    from diffusers_kit.restore import Restoration, figure  # noqa: F401


# -- a small model -------------------------------------------------------------------------------
def tiny(device: str = "cpu") -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(VE(sigma_min=0.01, sigma_max=8.0, num_levels=3),
                     NCSN(channels=8, blocks=1, data_shape=(1, 8, 8)), DenoisingScoreMatching(),
                     device=device)


SOLVER = dict(steps_per_level=2, epsilon=5e-5)


# -- progress ------------------------------------------------------------------------------------
def test_progress_true_draws_a_bar_with_the_right_total(capsys):
    model = tiny()
    model.sample(5, AnnealedLangevin(**SOLVER), batch_size=2, progress=True)
    err = capsys.readouterr().err
    steps = 3 * 2 + 1
    assert "sample" in err and f"{3 * steps}/{3 * steps}" in err, err  # three batches


def test_progress_still_takes_a_callable_and_false():
    model = tiny()
    told: list[int] = []
    model.sample(5, AnnealedLangevin(**SOLVER), batch_size=2, progress=told.append)
    assert sum(told) == 3 * (3 * 2 + 1)
    model.sample(5, AnnealedLangevin(**SOLVER), progress=False)


def test_fit_progress_true_draws_a_training_bar(capsys):
    data = Digits().load()
    tiny().fit(data, steps=4, batch_size=16, log_every=2, progress=True)
    err = capsys.readouterr().err
    assert "train" in err and "4/4" in err and "loss" in err, err


# -- saving what a run saves ---------------------------------------------------------------------
def test_save_writes_what_a_run_writes(tmp_path):
    model = tiny()
    dataset = Digits()
    result = model.sample(6, AnnealedLangevin(**SOLVER), seed=1)
    folder = result.save(tmp_path / "out", dataset, metrics={"swd": 1.5, "bad": float("nan")})
    with np.load(folder / "samples.npz") as npz:
        np.testing.assert_array_equal(npz["samples"], result.samples.numpy())
        np.testing.assert_allclose(npz["display"], dataset.to_display(result.samples).numpy())
        assert "labels" not in npz
    picture = Image.open(folder / "samples.png")
    assert picture.size == result.picture(dataset).size
    assert json.loads((folder / "metrics.json").read_text()) == {"swd": 1.5, "bad": None}
    grid = result.save_grid(tmp_path / "grid.png", dataset, columns=6)
    assert Image.open(grid).size[0] > Image.open(grid).size[1], "one row of six"


def test_the_picture_is_a_scatter_for_points_and_limits_big_grids(tmp_path):
    points = SampleResult(torch.randn(50, 2), 1)
    assert points.picture(TwoMoons()).size == (640, 640)
    assert points.picture().size == (640, 640)
    many = SampleResult(torch.zeros(100, 1, 8, 8), 1, labels=torch.arange(100) // 10)
    assert many.picture().size == many.picture(limit=None).size  # ten rows of ten (labels)
    assert many.picture(limit=9).size != many.picture().size
    folder = many.save(tmp_path, stem="s")
    with np.load(folder / "s.npz") as npz:
        assert npz["labels"].tolist() == (torch.arange(100) // 10).tolist()
        assert npz["display"].min() == 0.5, "images in [-1, 1] without a data set"


def test_evaluate_and_sample_give_the_runs_own_metrics(tmp_path, capsys):
    assert run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)[0] == 0
    run_dir = run_folders(tmp_path / "runs", "tiny")[0]
    saved = json.loads((run_dir / "metrics.json").read_text())
    model = Diffusion.from_run(run_dir)
    result = model.sample(12, AnnealedLangevin(steps_per_level=2, epsilon=5e-5), seed=3)
    metrics = model.evaluate(result, Digits(), SWD(projections=64), seed=3)
    assert metrics and set(metrics) <= set(saved)
    for key, value in metrics.items():
        assert value == pytest.approx(saved[key], rel=1e-6), key
    result.save(tmp_path / "again", Digits(), metrics=metrics)
    with np.load(tmp_path / "again" / "samples.npz") as a, np.load(run_dir / "samples.npz") as b:
        np.testing.assert_array_equal(a["samples"], b["samples"])


# -- memory: a default batch, halving, a clean error ---------------------------------------------
class Spy(AnnealedLangevin):
    """Records the batch sizes it is asked for; runs out of memory above ``fits``."""

    def __init__(self, fits: int | None = None, error: type[BaseException] = MemoryError,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.fits, self.error, self.asked = fits, error, []

    def sample(self, model, shape, **kwargs):
        self.asked.append(shape[0])
        if self.fits is not None and shape[0] > self.fits:
            raise self.error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().sample(model, shape, **kwargs)


def test_the_default_batch_caps_a_large_n(monkeypatch):
    assert api_module.default_batch_size(10, (1, 8, 8)) == 10
    assert api_module.default_batch_size(200_000, (1, 8, 8)) == api_module.DEFAULT_MAX_BATCH
    assert api_module.default_batch_size(200_000, (3, 256, 256)) == 21
    assert api_module.default_batch_size(5, (10**8,)) == 1
    model = tiny()
    whole = model.sample(10, AnnealedLangevin(**SOLVER), seed=2, batch_size=10)
    monkeypatch.setattr(api_module, "DEFAULT_MAX_BATCH", 4)
    spy = Spy(**SOLVER)
    split = model.sample(10, spy, seed=2)
    assert spy.asked == [4, 4, 2]
    assert split.batch_size == 4
    torch.testing.assert_close(split.samples, whole.samples, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("error", [MemoryError, torch.cuda.OutOfMemoryError],
                         ids=["MemoryError", "cuda.OutOfMemoryError"])
def test_an_automatic_batch_is_halved_when_memory_runs_out(error, capsys):
    model = tiny()
    whole = model.sample(10, AnnealedLangevin(**SOLVER), seed=2, batch_size=10)
    spy = Spy(fits=3, error=error, **SOLVER)
    result = model.sample(10, spy, seed=2, progress=True)
    assert spy.asked == [10, 5, 2, 2, 2, 2, 2]
    assert result.batch_size == 2
    torch.testing.assert_close(result.samples, whole.samples, rtol=1e-5, atol=1e-5)
    captured = capsys.readouterr().err
    assert "out of memory drawing 10 samples at once" in captured
    assert "35/35" in captured, "the failed batches' steps do not count"


def test_halving_without_a_bar_is_logged(caplog):
    spy = Spy(fits=4, **SOLVER)
    tiny().sample(6, spy)
    assert spy.asked == [6, 3, 3]
    assert "drawing 3 at a time" in caplog.text


def test_a_given_batch_that_does_not_fit_is_a_clean_error_with_the_hint():
    model = tiny()
    spy = Spy(fits=3, **SOLVER)
    with pytest.raises(SamplingOutOfMemory, match=r"sample\.batch_size=2") as info:
        model.sample(10, spy, batch_size=8)
    assert spy.asked == [8], "a batch_size given is used as given"
    assert isinstance(info.value, MemoryError)
    with pytest.raises(SamplingOutOfMemory, match="even 1 sample"):
        model.sample(4, Spy(fits=0, **SOLVER))


def test_the_cpu_allocators_error_counts_as_out_of_memory():
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                         "can't allocate memory: you tried to allocate 80000000000 bytes.")
    assert api_module.is_out_of_memory(error)
    assert not api_module.is_out_of_memory(RuntimeError("shape mismatch"))


# -- dkit sample ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    from diffusers_kit.cli.main import main

    assert main(["run", str(write_spec(tmp)), "--quiet"]) == 0
    return run_folders(tmp / "runs", "tiny")[0]


@pytest.mark.parametrize("error", [
    MemoryError,
    torch.cuda.OutOfMemoryError,
    lambda text: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                              "allocate 8000000000 bytes. Error code 12"),
], ids=["MemoryError", "cuda", "cpu-allocator"])
def test_dkit_sample_out_of_memory_exits_3_with_the_hint_and_leaves_no_folder(
        trained, capsys, monkeypatch, error):
    def fail(self, model, shape, **kwargs):
        raise error("out of memory")

    monkeypatch.setattr(AnnealedLangevin, "sample", fail)
    code, out, err = run_cli(["sample", str(trained), "--n", "200", "sample.batch_size=64"],
                             capsys)
    flat = " ".join(err.split())
    assert code == 3, err
    assert "out of memory" in flat and "sample.batch_size=16" in flat, flat
    assert "Traceback" not in err + out
    assert not (trained / "sampling").exists(), "no empty folder left behind"


def test_dkit_sample_splits_a_large_n_into_default_batches(trained, capsys, monkeypatch):
    monkeypatch.setattr(api_module, "DEFAULT_MAX_BATCH", 5)
    code, _, err = run_cli(["sample", str(trained), "--n", "12"], capsys)
    assert code == 0, err
    (folder,) = (trained / "sampling").iterdir()
    info = json.loads((folder / "sampling.json").read_text())
    assert info["batch_size"] == 5 and info["nfe"] == 3 * (4 * 2 + 1)
    with np.load(folder / "samples.npz") as npz:
        assert npz["samples"].shape == (12, 1, 8, 8)
    assert "sample" in err and "27/27" in err, "dkit sample shows a progress bar"



def test_the_old_module_diffusers_kit_api_still_gives_the_same_objects():
    """Diffusion moved to diffusers_kit.diffusion (issue 24); scripts importing it from
    diffusers_kit.api get the same class and helpers."""
    import diffusers_kit
    from diffusers_kit import api, diffusion

    assert api.Diffusion is diffusion.Diffusion is diffusers_kit.Diffusion
    assert api.default_batch_size is diffusion.default_batch_size
    assert api.SamplingOutOfMemory is diffusion.SamplingOutOfMemory

"""Hardening, round two (issue 29): a finished run is never changed by another command, SIGTERM
is handled like Ctrl-C, every array input goes through one reader, garbage is not reported as
success, the thread policy judges free cores by current use."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from diffusers_kit.checkpoint import load_metadata
from diffusers_kit.hookspecs import hookimpl
from diffusers_kit.registry import get_plugin_manager
from tests.helpers import MOONS_SPEC, copy_run, finished_run, run_cli, run_dirs, write_spec

CKPT = "checkpoint.safetensors"
MOONS = MOONS_SPEC.replace("log_every: 4", "log_every: 2")  # this module logs every 2 steps


def flat(text: str) -> str:
    return " ".join(text.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (the alive marker aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".alive"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run, trained once for the whole module."""
    return finished_run(tmp_path_factory.mktemp("finished"), MOONS)


# -- SIGTERM is Ctrl-C -----------------------------------------------------------------------------
class TerminateAt:
    """A plugin that sends this process SIGTERM at a training step (as `kill PID` would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def dkit_train_step(self, run, step, loss):  # type: ignore[no-untyped-def]
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_training_exits_143_with_the_resume_command(tmp_path, capsys):
    spec = write_spec(tmp_path, MOONS)
    manager = get_plugin_manager()
    plugin = TerminateAt(4)
    manager.register(plugin, name="terminate_at_4")
    try:
        code, out, err = run_cli(["run", str(spec), "--quiet"], capsys)
    finally:
        manager.unregister(plugin)
    (run_dir,) = run_dirs(tmp_path)
    assert code == 143, err
    assert "--resume" in flat(err) and "Traceback" not in out + err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert load_metadata(run_dir / CKPT)["training"]["train_step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is removed again"


class TerminateAtStart:
    """A plugin that sends this process SIGTERM when the run starts, before any training step."""

    @hookimpl
    def dkit_run_started(self, run):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_before_training_of_an_extension_gives_the_resume_command(finished, tmp_path,
                                                                          capsys):
    # before: 'terminated (SIGTERM)' alone, and the new folder's record said step 0 while it held
    # the finished run's step-8 checkpoint
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)
    manager = get_plugin_manager()
    plugin = TerminateAtStart()
    manager.register(plugin, name="terminate_at_start")
    try:
        code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                                  "--quiet"], capsys)
    finally:
        manager.unregister(plugin)
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    message = flat(err)
    assert code == 143 and "Traceback" not in out + err, message
    assert "after step 8" in message and f"--resume {new}" in message, message
    record = json.loads((new / "run.json").read_text())
    assert record["status"] == "interrupted" and record["step"] == 8
    assert snapshot(run_dir) == before
    code, _, err = run_cli(["run", str(spec), "--resume", str(new), "train.steps=10", "--quiet"],
                           capsys)
    assert code == 0, err
    assert load_metadata(new / CKPT)["training"]["train_step"] == 10


def test_sigterm_while_dkit_sample_writes_leaves_no_partial_folder(finished, tmp_path, capsys,
                                                                   monkeypatch):
    from PIL import Image

    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    monkeypatch.setattr(Image.Image, "save",
                        lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    code, out, err = run_cli(["sample", str(run_dir)], capsys)
    assert code == 143, err
    assert "Traceback" not in out + err
    assert not (run_dir / "sampling").exists(), "no folder holding only samples.npz"


# -- a finished run is immutable; output folders are unique and complete ---------------------------
DIGITS = """\
name: tiny
seed: 0
device: cpu
data: {kind: digits}
process: {kind: ddpm, num_steps: 100}
network: {kind: unet, channels: 8, channel_mult: [1], res_blocks: 1, attention_resolutions: []}
objective: {kind: ddpm_simple}
train: {steps: 2, batch_size: 16, log_every: 1}
output: {root: {root}}
"""
RESTORE = ["--operator", "denoise", "--method", "dps", "--n", "1", "--solver",
           "{kind: ddim, steps: 2}"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("digits"), DIGITS)[1]


def test_two_restores_in_the_same_second_get_two_folders(digits, tmp_path, capsys,
                                                         monkeypatch):
    from datetime import datetime

    import diffusers_kit.cli.restore as restore_cli

    run_dir = tmp_path / "run"
    shutil.copytree(digits, run_dir)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(restore_cli, "datetime", Frozen)
    for _ in range(3):
        code, _, err = run_cli(["restore", str(run_dir), *RESTORE, "--quiet"], capsys)
        assert code == 0, err
    folders = sorted((run_dir / "restoration").iterdir())
    assert len(folders) == 3
    assert all((f / "restore.json").is_file() for f in folders)


def test_a_failed_restore_leaves_no_folder(digits, tmp_path, capsys, monkeypatch):
    import errno

    import diffusers_kit.cli.restore as restore_cli

    run_dir = tmp_path / "run"
    shutil.copytree(digits, run_dir)

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(restore_cli, "write_json", full)
    code, out, err = run_cli(["restore", str(run_dir), *RESTORE, "--quiet"], capsys)
    assert code == 3 and "Traceback" not in out + err
    assert not (run_dir / "restoration").exists(), "no restore.png left alone"


def test_evaluate_with_another_runs_samples_never_writes_beside_them(finished, tmp_path,
                                                                     capsys):
    _, a = copy_run(finished[1], tmp_path, MOONS)
    b = tmp_path / "other" / "b"
    shutil.copytree(a, b)
    before_a, before_b = snapshot(a), snapshot(b)
    code, _, err = run_cli(["evaluate", str(a), "--samples", str(b / "samples.npz"), "--quiet"],
                           capsys)
    assert code == 0, err
    assert snapshot(b) == before_b, "the foreign run is untouched"
    after_a = snapshot(a)
    assert {k: v for k, v in after_a.items() if k in before_a} == before_a
    (written,) = [k for k in after_a if k not in before_a]
    assert written.startswith("evaluation/") and written.endswith("metrics.json")
    figures = json.loads(after_a[written])
    assert figures["samples"] == str((b / "samples.npz").resolve()) and "swd" in figures
    named = tmp_path / "mine"
    code, _, err = run_cli(["evaluate", str(a), "--samples", str(b / "samples.npz"), "--out",
                            str(named), "--quiet"], capsys)
    assert code == 0, err
    assert "swd" in json.loads((named / "metrics.json").read_text())
    assert snapshot(b) == before_b


def test_resume_with_fewer_steps_is_refused_with_the_reason(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)
    code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=4",
                              "--quiet"], capsys)
    message = flat(err)
    assert code == 2 and "train.steps" in message and "at least 8" in message, message
    assert "Traceback" not in out + err
    assert snapshot(run_dir) == before and run_dirs(tmp_path) == [run_dir]


def test_extending_a_finished_run_writes_a_new_folder_and_leaves_it_untouched(finished,
                                                                               tmp_path, capsys,
                                                                               monkeypatch):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)
    monkeypatch.chdir(tmp_path)  # a relative RUN_DIR is recorded as the absolute folder
    code, _, err = run_cli(["run", str(spec), "--resume", str(run_dir.relative_to(tmp_path)),
                            "train.steps=10", "--quiet"], capsys)
    assert code == 0, err
    assert snapshot(run_dir) == before, "the finished run's files never change"
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    record = json.loads((new / "run.json").read_text())
    assert record["status"] == "finished" and record["resumed_from"] == str(run_dir)
    assert load_metadata(new / CKPT)["training"]["train_step"] == 10
    assert "resuming from step 8" in (new / "run.log").read_text()


def test_re_evaluating_a_finished_run_that_fails_keeps_it_finished(finished, tmp_path, capsys,
                                                                  monkeypatch):
    import diffusers_kit.run.stages as stages

    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "evaluate_metrics", broken)
    code, _, err = run_cli(["run", str(spec), "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 3, err
    assert snapshot(run_dir) == before
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    assert (new / CKPT).is_file(), "the new folder holds the weights it evaluated"


def test_resume_refuses_run_files_that_link_outside(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    record = json.loads((run_dir / "run.json").read_text())
    record["status"] = "interrupted"
    (run_dir / "run.json").write_text(json.dumps(record))
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text("not dkit's\n")
    (run_dir / "run.log").unlink()
    (run_dir / "run.log").symlink_to(elsewhere)
    code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                              "--quiet"], capsys)
    assert code == 2 and "run.log" in err and "Traceback" not in out + err
    assert elsewhere.read_text() == "not dkit's\n"


class RemoveRunFolderAt:
    """A plugin that deletes the run's folder at a training step (as `rm -rf` beside it)."""

    @hookimpl
    def dkit_train_step(self, run, step, loss):  # type: ignore[no-untyped-def]
        if step == 2:
            shutil.rmtree(run.dir)


def test_a_run_whose_folder_is_deleted_during_training_stops_with_a_message(tmp_path,
                                                                            capsys):
    spec = write_spec(tmp_path, MOONS)
    manager = get_plugin_manager()
    plugin = RemoveRunFolderAt()
    manager.register(plugin, name="remove_run_folder")
    try:
        code, out, err = run_cli(["run", str(spec), "--quiet"], capsys)
    finally:
        manager.unregister(plugin)
    assert code == 3, err
    assert "removed while the run" in flat(err) and "Traceback" not in out + err
    assert run_dirs(tmp_path) == [], "the folder is not recreated"


# -- one array reader ------------------------------------------------------------------------------
def bad_array_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Array files dkit must refuse, each with a phrase its message has."""
    import numpy as np

    good = np.zeros((2, 1, 8, 8), dtype=np.float32)
    files: dict[str, tuple[Path, str]] = {}

    def npz(name: str, phrase: str, **arrays: object) -> None:
        np.savez(folder / f"{name}.npz", **arrays)
        files[name] = (folder / f"{name}.npz", phrase)

    np.savez(folder / "whole.npz", x=good, images=good, samples=good, x_T=good)
    data = (folder / "whole.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(data[: len(data) // 2])
    files["truncated"] = (folder / "truncated.npz", "truncated or damaged")
    npz("structured", "structured", samples=np.zeros(2, dtype=[("a", "f4"), ("b", "f4")]))
    npz("datetime", "datetime64", samples=np.array(["2026-01-01"] * 128, dtype="datetime64[D]"
                                             ).reshape(2, 1, 8, 8))
    npz("empty", "is empty", samples=np.zeros((0, 1, 8, 8), dtype=np.float32))
    npz("nan", "NaN or infinite", samples=np.full((2, 1, 8, 8), np.nan, dtype=np.float32))
    np.save(folder / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    files["object"] = (folder / "object.npy", "Python objects")
    (folder / "passwd.npy").write_text("root:x:0:0:root:/root:/bin/bash\n")
    files["text"] = (folder / "passwd.npy", "not a .npz or .npy file")
    header = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': " \
             b"(200000, 100000, 1000), }"
    (folder / "huge.npy").write_bytes(header + b" " * (127 - len(header)) + b"\n" + b"\0" * 64)
    files["huge"] = (folder / "huge.npy", "huge.npy")
    return files


@pytest.mark.parametrize("case", ["truncated", "structured", "datetime", "empty", "nan",
                                  "object", "text", "huge"])
def test_the_array_reader_refuses_bad_files_naming_them(tmp_path, case):
    from diffusers_kit.data.arrays import ArrayFile, ArrayFileError, NpzArrays

    path, phrase = bad_array_files(tmp_path)[case]
    with pytest.raises(ArrayFileError) as caught, ArrayFile(path) as file:
        file.array(file.names[0] if file.names else None)
    assert path.name in str(caught.value) and phrase in str(caught.value)
    assert "allow_pickle" not in str(caught.value)
    with pytest.raises(ValueError, match=path.name):
        NpzArrays(str(path), scale="none").load()


@pytest.mark.parametrize("case", ["truncated", "structured", "datetime", "empty", "object"])
def test_every_array_option_refuses_bad_files_with_exit_2(digits, tmp_path, capsys, case):
    path, phrase = bad_array_files(tmp_path)[case]
    commands = {
        "--images": ["restore", str(digits), *RESTORE, "--images", str(path)],
        "--init": ["sample", str(digits), "--solver", "{kind: ddim, steps: 2}", "--init",
                   str(path)],
        "--samples": ["evaluate", str(digits), "--metrics", "swd", "--samples", str(path)],
        # an inpainting mask file: a truncated one was BadZipFile, exit 70 (issue 29)
        "mask:": ["restore", str(digits), *RESTORE, "--operator",
                  f"{{kind: inpaint, mask: {path}}}"],
    }
    before = snapshot(digits)
    for option, args in commands.items():
        code, out, err = run_cli(args, capsys)
        message = flat(out + err)
        assert code == 2, (option, message)
        assert path.name in message and "Traceback" not in message, (option, message)
        assert phrase in message and "allow_pickle" not in message, (option, message)
    assert snapshot(digits) == before, "nothing written"


def test_sixteen_bit_grayscale_pngs_keep_their_values(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusers_kit.data.folder import ImageFolder

    folder = tmp_path / "wide"
    folder.mkdir()
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for k in range(4):
        Image.fromarray(levels).save(folder / f"{k}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    splits = ImageFolder(str(folder), size=64, channels=1).load()
    pixels = splits.train[0, 0].numpy()
    assert np.allclose(pixels, levels / 32767.5 - 1.0, atol=1e-3)
    assert (pixels > 0.99).mean() < 0.02, "not clipped to +1"


# -- threads: free cores judged by what is busy now ------------------------------------------------
def readings(*pairs: tuple[int, int]):  # type: ignore[no-untyped-def]
    values = iter(pairs)
    return lambda: next(values)


def test_an_idle_machine_after_an_install_gets_every_core(monkeypatch):
    from diffusers_kit import threads

    # the 1-minute load average still counts the pip install that just ended ...
    monkeypatch.setattr(os, "getloadavg", lambda: (0.8, 0.5, 0.2))
    # ... but over the sample no core was busy (busy ticks unchanged, 20 ticks elapsed)
    idle = threads.busy_cores(read=readings((500, 9000), (500, 9020)), sleep=lambda s: None,
                              online=2)
    assert idle == 0.0
    assert threads.choose_threads("auto", environ={}, cores=2, load=idle) == 2
    one_busy = threads.busy_cores(read=readings((500, 9000), (510, 9020)),
                                  sleep=lambda s: None, online=2)
    assert one_busy == pytest.approx(1.0)
    assert threads.choose_threads("auto", environ={}, cores=2, load=one_busy) == 1


def test_cpu_times_reads_proc_stat_and_falls_back_to_the_load_average(tmp_path, monkeypatch):
    from diffusers_kit import threads

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n")
    assert threads.cpu_times(str(stat)) == (100 + 5 + 50 + 3 + 2, 980)
    assert threads.cpu_times(str(tmp_path / "none")) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert threads.busy_cores(read=lambda: None, sleep=lambda s: None) == 1.5


# -- garbage is not success ------------------------------------------------------------------------
def test_nan_samples_fail_the_run_with_exit_1_naming_stage_and_solver(tmp_path, capsys,
                                                                     monkeypatch):
    import torch

    from diffusers_kit.diffusion import Diffusion

    real = Diffusion.sample

    def nan_sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(self, *args, **kwargs)
        result.samples = torch.full_like(result.samples, float("nan"))
        return result

    monkeypatch.setattr(Diffusion, "sample", nan_sample)
    code, out, err = run_cli(["run", str(write_spec(tmp_path, MOONS)), "--quiet"], capsys)
    message = flat(err)
    assert code == 1, message
    assert "sample stage" in message and "annealed_langevin" in message
    assert "Traceback" not in out + err
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / CKPT).is_file(), "the training written before is kept"
    assert not (run_dir / "samples.npz").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    code, out, err = run_cli(["sample", str(run_dir)], capsys)
    assert code == 1 and "sample stage" in flat(err)
    assert not (run_dir / "sampling").exists()


def test_evaluate_of_nan_samples_is_refused(finished, tmp_path, capsys):
    import numpy as np

    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    np.savez(tmp_path / "nan.npz", samples=np.full((16, 2), np.nan, dtype=np.float32))
    code, out, err = run_cli(["evaluate", str(run_dir), "--samples", str(tmp_path / "nan.npz")],
                             capsys)
    assert code == 2 and "nan.npz" in flat(err) and "NaN" in err and "Traceback" not in out


# -- seeds and labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-5", str(2**70), "1.5", "many"])
@pytest.mark.parametrize("command", ["sample", "restore", "sweep", "likelihood"])
def test_seed_options_are_validated_like_the_spec(finished, capsys, command, seed):
    _, run_dir = finished
    code, out, err = run_cli([command, str(run_dir), "--seed", seed], capsys)
    message = flat(err)
    assert code == 2 and "--seed" in message and "2**63 - 1" in message, message
    assert "Traceback" not in out + err


def test_seeds_that_share_their_low_32_bits_give_different_samples(finished, tmp_path, capsys):
    import numpy as np

    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    drawn = []
    for seed in ("0", str(2**32)):
        code, _, err = run_cli(["sample", str(run_dir), "--seed", seed], capsys)
        assert code == 0, err
        (folder,) = [f for f in (run_dir / "sampling").iterdir() if f not in drawn]
        drawn.append(folder)
    with np.load(drawn[0] / "samples.npz") as a, np.load(drawn[1] / "samples.npz") as b:
        assert not np.array_equal(a["samples"], b["samples"])


def test_labels_on_an_unconditional_model_are_refused(digits, capsys):
    before = snapshot(digits)
    code, _, err = run_cli(["sample", str(digits), "--labels", "3", "--solver",
                              "{kind: ddim, steps: 2}"], capsys)
    message = flat(err)
    assert code == 2 and "sample.labels" in message and "unconditional" in message, message
    assert snapshot(digits) == before


# -- bounded work ----------------------------------------------------------------------------------
def test_a_sweep_caps_its_values_before_any_work(finished, tmp_path, capsys):
    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)
    many = ",".join(str(k) for k in range(1, 10_001))
    code, out, err = run_cli(["sweep", str(run_dir),
                              f"sample.solver.steps_per_level={many}"], capsys)
    message = flat(err)
    assert code == 2 and "at most 50 values" in message and "--max-values" in message, message
    assert "10000 values" in message and "Traceback" not in out + err
    assert snapshot(run_dir) == before
    code, _, err = run_cli(["sweep", str(run_dir), "sample.solver.steps_per_level=1,2,3",
                            "--max-values", "2"], capsys)
    assert code == 2 and "at most 2 values" in flat(err)


# -- nothing followed outside the output root ------------------------------------------------------
def test_a_symlinked_group_folder_is_not_followed_out_of_the_root(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(elsewhere, target_is_directory=True)
    code, out, err = run_cli(["run", str(write_spec(tmp_path, MOONS)), "--quiet"], capsys)
    message = flat(err)
    assert code == 2 and "symbolic link" in message and "name" in message, message
    assert "Traceback" not in out + err
    assert list(elsewhere.iterdir()) == [], "nothing written through the link"


def test_a_symlinked_sampling_folder_is_not_written_through(finished, tmp_path, capsys):
    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / "sampling").symlink_to(elsewhere, target_is_directory=True)
    code, out, err = run_cli(["sample", str(run_dir)], capsys)
    assert code == 3 and "symbolic link" in flat(err) and "Traceback" not in out + err
    assert list(elsewhere.iterdir()) == []


# -- checksums are required ------------------------------------------------------------------------
def test_a_checkpoint_whose_checksum_was_removed_is_refused(finished, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from diffusers_kit.checkpoint import CHECKSUM_KEY, read_header

    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    raw, _ = read_header(run_dir / CKPT)
    tensors = load_file(str(run_dir / CKPT))
    edited = {k: (v.fill_(float("nan")) if not k.startswith("train.") and v.is_floating_point()
                  else v) for k, v in tensors.items()}
    save_file(edited, str(run_dir / CKPT),
              metadata={k: v for k, v in raw.items() if k != CHECKSUM_KEY})
    code, out, err = run_cli(["sample", str(run_dir)], capsys)
    message = flat(err)
    assert code == 4 and "no checksum" in message and "--trust-unverified" in message, message
    assert not (run_dir / "sampling").exists() and "Traceback" not in out + err
    # trusted on purpose, the file loads (and its NaN weights are then caught as NaN samples)
    code, _, err = run_cli(["--trust-unverified", "sample", str(run_dir)], capsys)
    assert code == 1 and "sample stage" in flat(err), err
    assert "DKIT_TRUST_UNVERIFIED" not in os.environ, "trusted for that command only"


# -- what a trained model is cannot change on sample / sweep ---------------------------------------
@pytest.mark.parametrize("args", [["sample", "{run}", "process.sigma_max=4.0"],
                                  ["sweep", "{run}", "process.sigma_max=2.0,4.0"],
                                  ["sweep", "{run}", "data.kind=gaussian_mixture,two_moons"],
                                  ["sample", "{run}", "network.width=8"]])
def test_changing_what_the_model_is_on_sample_or_sweep_is_refused(finished, tmp_path, capsys,
                                                                  args):
    _, run_dir = copy_run(finished[1], tmp_path, MOONS)
    before = snapshot(run_dir)
    code, out, err = run_cli([a.replace("{run}", str(run_dir)) for a in args], capsys)
    message = flat(err)
    assert code == 2 and "trained" in message and "Traceback" not in out + err, message
    assert args[-1].split("=")[0] in message
    assert snapshot(run_dir) == before


# -- messages that fit -----------------------------------------------------------------------------
def test_a_full_disk_in_dkit_sample_gives_advice_that_fits(finished, tmp_path, capsys,
                                                           monkeypatch):
    import errno

    import diffusers_kit.cli.sample as sample_cli

    _, run_dir = copy_run(finished[1], tmp_path, MOONS)

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "sampling"))

    monkeypatch.setattr(sample_cli, "write_json", full)
    code, _, err = run_cli(["sample", str(run_dir)], capsys)
    message = flat(err)
    assert code == 3 and "No space left" in message, message
    assert "checkpoint" not in message and "partial output was removed" in message
    assert not (run_dir / "sampling").exists()


def test_an_overlong_plugin_name_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["new-plugin", "dkit-" + "w" * 300], capsys)
    message = flat(err)
    assert code == 2 and "at most 100 characters" in message, message
    assert "Traceback" not in out + err and list(tmp_path.iterdir()) == []


# -- a component that raises while being built is named ------------------------------------------
def test_a_component_raising_in_its_constructor_is_named(capsys):
    from diffusers_kit.processes.base import NoiseProcess
    from diffusers_kit.processes.ve import VE
    from diffusers_kit.registry import Registry
    from diffusers_kit.run.build import Builder, ComponentBuildError

    class Broken(VE):
        def __init__(self, sigma_max: float = 2.0) -> None:
            raise ZeroDivisionError("division by zero")

    registry = Registry()
    registry.add_kind("process", NoiseProcess)
    registry.add("process", "broken", Broken)
    with pytest.raises(ComponentBuildError) as caught:
        Builder(registry, None).build(("process",), "process", {"kind": "broken"})
    text = str(caught.value)
    assert "process" in text and "'broken'" in text and "Broken" in text
    assert "ZeroDivisionError" in text and "division by zero" in text

"""Output that a user pipes (``dkit plugins | cat``, ``dkit run ... | tee log``) is not squeezed
into rich's 80-column fallback, and a busy machine's thread choice is announced."""

from __future__ import annotations

import re

import pytest

from diffusers_kit.cli.main import thread_note
from diffusers_kit.console import PIPED_WIDTH, make_console
from diffusers_kit.registry import get_registry
from tests.helpers import run_cli, write_spec


@pytest.fixture(autouse=True)
def no_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)


def test_a_piped_console_is_wide_unless_columns_says_otherwise(monkeypatch, capsys):
    assert make_console().width == PIPED_WIDTH  # capsys: not a terminal
    assert make_console(stderr=True).width == PIPED_WIDTH
    assert make_console(width=90).width == 90
    monkeypatch.setenv("COLUMNS", "132")
    assert make_console().width == 132


def test_piped_dkit_plugins_keeps_each_component_on_one_line(capsys):
    code, out, err = run_cli(["plugins"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    for kind in get_registry().kinds.values():
        for component in kind.components.values():
            summary = " ".join(component.summary.split())
            assert any(component.name in line and summary in " ".join(line.split())
                       for line in lines), (component.kind, component.name, out[:2000])
    assert max(map(len, lines)) > 80


def test_piped_dkit_run_summary_rows_are_not_wrapped(tmp_path, capsys):
    code, out, err = run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)
    assert code == 0, err
    (swd,) = [line for line in out.splitlines() if re.match(r"│ swd ", line)]
    assert "floor" in swd and "ratio" in swd and "n=12" in swd, out
    (results,) = [line for line in out.splitlines() if line.startswith("results in ")]
    assert "samples.png" in results


def test_the_thread_note_says_why_and_how_to_choose():
    note = thread_note("auto", 1, environ={}, cores=2, load=1.2)
    assert note is not None
    assert "1.2 of this machine's 2 cores busy" in note and "1 thread " in note
    assert "--threads N" in note and "OMP_NUM_THREADS" in note
    assert thread_note("auto", 2, environ={}, cores=2, load=0.1) is None  # a free machine
    assert thread_note("1", 1, environ={}, cores=2, load=1.5) is None  # the user chose
    assert thread_note("auto", 1, environ={"OMP_NUM_THREADS": "1"}, cores=2, load=1.5) is None


def test_a_computing_command_prints_the_note_on_a_busy_machine(tmp_path, capsys, monkeypatch):
    from diffusers_kit import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    try:
        code, _, err = run_cli(["run", str(write_spec(tmp_path)), "--only", "sample",
                                "--from", str(tmp_path / "nope")], capsys)
        assert code == 2
        assert "other processes keep 1.0 of this machine's 2 cores busy" in err, err
        code, _, err = run_cli(["validate", str(write_spec(tmp_path))], capsys)
        assert code == 0 and "cores busy" not in err  # a command that computes nothing
    finally:
        threads.apply_thread_policy(1)  # the rest of the session: one thread, as before


SPEC_2D = """\
name: moons
seed: 0
device: cpu
data: {kind: two_moons, n_train: 256, n_heldout: 64}
process: {kind: ve, sigma_min: 0.1, sigma_max: 4.0, num_levels: 4}
network: {kind: mlp, width: 16, blocks: 1, prediction: score}
objective: {kind: ism}
train: {steps: 2, batch_size: 32, log_every: 1}
sample:
  n: 40
  solver: {kind: langevin, steps: 20, step_size: 0.002}
evaluate:
  metrics: [{kind: swd, projections: 16}]
output: {root: {root}}
"""


def test_progressive_for_2d_data_draws_a_scatter_per_recorded_step(tmp_path, capsys):
    from PIL import Image

    from diffusers_kit.pipeline import run_folders

    assert run_cli(["run", str(write_spec(tmp_path, SPEC_2D)), "--quiet"], capsys)[0] == 0
    (run,) = run_folders(tmp_path / "runs", "moons")
    code, _, err = run_cli(["sample", str(run), "--progressive"], capsys)
    assert code == 0, err
    (picture,) = (run / "sampling").glob("*/progressive.png")
    width, height = Image.open(picture).size
    assert width >= 5 * height  # a row of panels, not one scatter of the last step

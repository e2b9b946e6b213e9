"""Output containment and the CLI's error contract (issue 14): a run writes only under
output.root/<name>/; bad names and roots are spec errors before anything is created; every
failure has a documented exit status and --debug shows the traceback."""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
from pathlib import Path

import pytest

from diffusers_kit.hookspecs import hookimpl
from diffusers_kit.metrics.base import Metric
from diffusers_kit.outputs import checked_root, make_run_dir, output_issues
from diffusers_kit.registry import get_plugin_manager
from diffusers_kit.spec import SpecError
from tests.helpers import TINY_SPEC, run_cli, write_spec

cli_main = importlib.import_module("diffusers_kit.cli.main")  # the package re-exports main()


@pytest.mark.parametrize("name,phrase", [("..", "start with '.'"), (".", "start with '.'"),
                                         ("a/b", "without '/'"), ("a\x00b", "NUL"),
                                         ("n" * 300, "at most 100"), ("", "non-empty")])
def test_bad_run_names_are_refused(tmp_path, name, phrase):
    (issue,) = output_issues(tmp_path, name)
    assert issue.path == ("name",) and phrase in issue.expected


def test_a_root_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    for root in (afile, afile / "below"):
        (issue,) = output_issues(root, "ok")
        assert issue.path == ("output", "root") and "is a file" in issue.expected


def test_a_root_with_a_nul_byte_or_an_overlong_component_is_refused(tmp_path):
    assert "NUL" in output_issues("runs\x00x", "ok")[0].expected
    assert "255 bytes" in output_issues(tmp_path / ("d" * 300), "ok")[0].expected


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_root_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (issue,) = output_issues(locked / "runs", "ok")
        assert "not writable" in issue.expected
    finally:
        locked.chmod(0o700)


def test_tilde_is_expanded_never_a_literal_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    root = checked_root("~/runs", "ok")
    assert root == tmp_path / "home" / "runs"
    made = make_run_dir("~/runs", "ok")
    assert made.parent == tmp_path / "home" / "runs" / "ok"
    assert not (tmp_path / "~").exists()
    assert "names no user" in output_issues("~no_such_user_dkit/runs", "ok")[0].expected


def test_run_folders_never_collide(tmp_path):
    made = {make_run_dir(tmp_path, "same") for _ in range(5)}
    assert len(made) == 5 and all(p.parent == tmp_path / "same" for p in made)


def test_make_run_dir_refuses_an_escaping_name(tmp_path):
    with pytest.raises(SpecError):
        make_run_dir(tmp_path / "runs", "..")
    assert not (tmp_path / "runs").exists()


def test_a_root_that_is_a_file_is_a_spec_error_in_dkit_run(tmp_path, capsys):
    afile = tmp_path / "runs"
    afile.write_text("not a folder")
    path = write_spec(tmp_path)
    code, out, err = run_cli(["run", str(path), "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "output.root" in flat and "is a file" in flat
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "root:" in text)
    assert f"{path}:{line}" in flat
    assert afile.read_text() == "not a folder" and "Traceback" not in out + err


class NaNMetric(Metric):  # a metric like any registered one: derives from the base
    def evaluate(self, samples, data, generator, model):  # type: ignore[no-untyped-def]
        return {"swd": math.nan, "spread": math.inf}


class InjectNaN:
    @hookimpl
    def dkit_run_started(self, run):  # type: ignore[no-untyped-def]
        run.components.metrics[:] = [("nan", NaNMetric())]


def test_nan_metrics_are_written_as_json_null(tmp_path, capsys):
    manager = get_plugin_manager()
    plugin = InjectNaN()
    manager.register(plugin, name="inject_nan")
    try:
        code, _, err = run_cli(["run", str(write_spec(tmp_path)), "--quiet",
                                "train.steps=1"], capsys)
    finally:
        manager.unregister(plugin)
    # NaN metrics fail the run (exit 1, issue 29), after writing them for a look
    assert code == 1 and "swd" in err and "evaluate stage" in " ".join(err.split()), err
    (run_dir,) = [p for p in (tmp_path / "runs" / "tiny").iterdir() if not p.is_symlink()]

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["swd"] is None and metrics["spread"] is None


# -- exit statuses and --debug -----------------------------------------------------------------
def test_debug_shows_the_traceback_of_a_spec_error_anywhere_on_the_line(tmp_path, capsys):
    path = write_spec(tmp_path, TINY_SPEC.replace("steps: 6", "steps: many"))
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli(["validate", str(path), "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "train.steps" in err


def failing(exc: BaseException):  # type: ignore[no-untyped-def]
    def command(args):  # type: ignore[no-untyped-def]
        raise exc

    return command


@pytest.mark.parametrize("exc,status,phrase", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run"), 3, "free some space"),
    (PermissionError(errno.EACCES, "Permission denied", "/data"), 3, "writable output.root"),
    (MemoryError(), 3, "out of memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 3, "out of memory"),
    # torch's CPU allocator says it another way; the CLI uses the same predicate as sampling
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 4294967296 bytes"), 3,
     "out of memory"),
    (ZeroDivisionError("division by zero"), 70, "re-run with --debug"),
])
def test_failures_outside_the_spec_have_their_exit_status(tmp_path, capsys, monkeypatch, exc,
                                                          status, phrase):
    monkeypatch.setattr("diffusers_kit.cli.validate.validate_command", failing(exc))
    code, out, err = run_cli(["validate", str(write_spec(tmp_path))], capsys)
    flat = " ".join(err.split())
    assert code == status and phrase in flat and "Traceback" not in out + err


def test_debug_lets_an_internal_error_raise_for_the_bug_report(tmp_path, monkeypatch):
    monkeypatch.setattr("diffusers_kit.cli.validate.validate_command",
                        failing(ZeroDivisionError("boom")))
    with pytest.raises(ZeroDivisionError):
        cli_main.main(["--debug", "validate", str(write_spec(tmp_path))])


def test_the_documented_statuses_match_the_code():
    page = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for status in (cli_main.TRAINING_STOPPED, cli_main.USER_ERROR, cli_main.ENVIRONMENT_ERROR,
                   cli_main.CORRUPT_FILE, cli_main.PLUGIN_HOOK_FAILED, cli_main.INTERNAL_ERROR,
                   130):
        assert f"| {status} |" in page, status


def test_an_unwritable_root_is_refused_even_when_running_as_root(tmp_path, monkeypatch):
    """As root every folder is writable, so the permission answer is simulated here."""
    monkeypatch.setattr("diffusers_kit.outputs.os.access", lambda path, mode: False)
    (issue,) = output_issues(tmp_path / "runs", "ok")
    assert issue.path == ("output", "root") and f"{tmp_path} is not writable" in issue.expected

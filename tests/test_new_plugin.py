"""``dkit new-plugin`` (issue 15): a scaffolded plugin with a process and a solver passes its
own tests (``diffusers_kit.testing``) and its spec validates; bad names and occupied folders are
refused with exit status 2 and nothing written.

``pip install -e`` is too slow for the suite: the scaffolded distribution is made visible the
way tests/test_plugins.py does it, a ``.dist-info`` with its entry point on ``sys.path`` (and on
``PYTHONPATH`` for its own tests, run by pytest in a subprocess).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffusers_kit
from diffusers_kit import registry as registry_module
from diffusers_kit.cli.plugins import api_requirement
from tests.helpers import run_cli


@pytest.fixture
def fresh_registry():
    registry_module.reset_registry()
    yield
    registry_module.reset_registry()


def install(plugin: Path, name: str, monkeypatch) -> Path:
    """Make the scaffolded distribution at ``plugin`` visible to importlib.metadata and import,
    from the entry point its own pyproject.toml declares; returns the site folder."""
    pyproject = (plugin / "pyproject.toml").read_text()
    match = re.search(r'^\[project\.entry-points\.diffusers_kit\]\n(\w+) = "([\w.]+)"$',
                      pyproject, re.MULTILINE)
    assert match, pyproject
    site = plugin.parent / "site"
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[diffusers_kit]\n{match[1]} = {match[2]}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(plugin / "src"))
    return site


def run_generated_tests(plugin: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           # the diffusers_kit under test, not whichever one is installed
           "PYTHONPATH": os.pathsep.join([str(plugin / "src"), str(site),
                                          str(Path(diffusers_kit.__file__).parents[1])])}
    return subprocess.run([sys.executable, "-m", "pytest", str(plugin / "tests"), "-q",
                           "-p", "no:cacheprovider"], cwd=plugin, env=env, text=True,
                          capture_output=True, timeout=600)


def test_a_scaffolded_process_and_solver_pass_their_own_tests(tmp_path, monkeypatch, capsys,
                                                              fresh_registry):
    plugin = tmp_path / "dkit-scaffolded"
    code, out, err = run_cli(["new-plugin", "dkit-scaffolded", "--kind", "process", "--kind",
                              "solver", "--dir", str(plugin)], capsys)
    assert code == 0, err
    assert "created" in out and "pip install -e ." in " ".join(out.split())
    package = plugin / "src" / "dkit_scaffolded"
    for path in ("pyproject.toml", "README.md", "specs/example.yaml",
                 "tests/test_dkit_scaffolded.py", "src/dkit_scaffolded/__init__.py",
                 "src/dkit_scaffolded/process.py", "src/dkit_scaffolded/solver.py"):
        assert (plugin / path).is_file(), path
    assert not (package / "metric.py").exists(), "only the kinds asked for"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging left"
    pyproject = (plugin / "pyproject.toml").read_text()
    assert '"diffusers_kit>=' in pyproject
    assert f'DKIT_PLUGIN_API = "{api_requirement()}"' in (package / "__init__.py").read_text()
    if shutil.which("ruff"):  # what it writes is lint-clean under its own settings
        lint = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=plugin, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr

    site = install(plugin, "dkit-scaffolded", monkeypatch)
    try:
        registry = registry_module.get_registry()
        assert not {k: v for k, v in registry.plugin_errors.items() if "scaffolded" in k}
        assert registry.get("process", "scaffolded_linear_log_snr").source == "dkit-scaffolded"
        assert registry.get("solver", "scaffolded_euler_maruyama").source == "dkit-scaffolded"
        code, out, err = run_cli(["validate", str(plugin / "specs" / "example.yaml"),
                                  "--build"], capsys)
        assert code == 0, err
        assert "is valid" in out

        result = run_generated_tests(plugin, site)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert re.search(r"\b\d+ passed\b", result.stdout) and "failed" not in result.stdout
    finally:
        sys.modules.pop("dkit_scaffolded", None)
        for module in [m for m in sys.modules if m.startswith("dkit_scaffolded.")]:
            sys.modules.pop(module)


@pytest.mark.slow
def test_every_other_kind_scaffolds_a_working_example(tmp_path, monkeypatch, capsys,
                                                      fresh_registry):
    """data (given by its old name, dataset), metric, forward model, guidance, network and
    objective: each example passes its generated tests, and the spec using them builds."""
    plugin = tmp_path / "dkit-kinds"
    kinds = ["dataset", "metric", "forward_model", "guidance", "network", "objective"]
    code, _, err = run_cli(["new-plugin", "dkit-kinds", "--dir", str(plugin),
                            *[a for kind in kinds for a in ("--kind", kind)]], capsys)
    assert code == 0, err
    package = plugin / "src" / "dkit_kinds"
    assert {p.stem for p in package.glob("*.py")} == {
        "__init__", "data", "metric", "forward_model", "guidance", "network", "objective"}
    site = install(plugin, "dkit-kinds", monkeypatch)
    try:
        code, _, err = run_cli(["validate", str(plugin / "specs" / "example.yaml"),
                                  "--build"], capsys)
        assert code == 0, err
        result = run_generated_tests(plugin, site)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] == "dkit_kinds"]:
            sys.modules.pop(module)


def test_an_occupied_folder_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["new-plugin", "dkit-mine", "--dir", str(folder)], capsys)
    assert code == 2
    assert "exists and is not empty" in " ".join(err.split())
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["new-plugin", "dkit-mine", "--dir", str(tmp_path / "file")], capsys)
    assert code == 2 and "not a folder" in err


def test_an_empty_folder_and_the_default_folder_are_used(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["new-plugin", "dkit-empty", "--dir", str(tmp_path / "empty")],
                           capsys)
    assert code == 0, err
    assert (tmp_path / "empty" / "src" / "dkit_empty" / "solver.py").is_file(), "default kind"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["new-plugin", "Dkit.Other_Name"], capsys)
    assert code == 0, err
    assert (tmp_path / "Dkit.Other_Name" / "src" / "dkit_other_name" / "__init__.py").is_file()


@pytest.mark.parametrize(("name", "message"), [
    ("bad name!", "is not a distribution name"),
    ("dkit-", "is not a distribution name"),
    ("1-plugin", "not an identifier"),
    ("class", "not an identifier"),
    ("json", "standard library"),
    ("diffusers-kit", "taken by dkit"),
    ("torch", "already importable"),
])
def test_bad_names_are_refused_with_the_reason(tmp_path, capsys, name, message):
    code, _, err = run_cli(["new-plugin", name, "--dir", str(tmp_path / "p")], capsys)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_an_unknown_kind_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["new-plugin", "dkit-x", "--kind", "sampler", "--dir",
                            str(tmp_path / "p")], capsys)
    assert code == 2
    flat = " ".join(err.split())
    assert "'sampler' is not a kind with an example" in flat and "solver" in flat
    assert not (tmp_path / "p").exists()

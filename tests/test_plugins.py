"""The plugin system: entry points, the example distribution, broken plugins, the CLI tables."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import textwrap
from pathlib import Path

import pytest

from diffusers_kit import registry as registry_module
from diffusers_kit.graph import execute
from diffusers_kit.spec import load_spec
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "dkit-example"


def _fake_distribution(site: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution (``.dist-info``) that importlib.metadata will find."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def fresh_registry():
    registry_module.reset_registry()
    yield
    registry_module.reset_registry()


@pytest.fixture
def example_plugin(tmp_path, monkeypatch, fresh_registry):
    """The dkit-example distribution, as installed, or made visible from its own metadata."""
    installed = any(d.metadata["Name"] == "dkit-example" for d in metadata.distributions())
    if not installed:
        import tomllib

        project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
        group = project["project"]["entry-points"]["diffusers_kit"]
        lines = "[diffusers_kit]\n" + "".join(f"{k} = {v}\n" for k, v in group.items())
        _fake_distribution(tmp_path / "site", "dkit-example", lines)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    yield


def test_builtin_components_come_through_the_entry_point_hook(fresh_registry):
    manager, _, _ = registry_module.plugin_manager()
    from diffusers_kit import builtin

    assert manager.is_registered(builtin)
    names = {ep.name for ep in metadata.entry_points(group="diffusers_kit")}
    assert "builtin" in names, "the built-in plugin is announced like any third-party one"
    registry = registry_module.get_registry()
    assert registry.get("process", "ve").source == "diffusers_kit"


def test_example_plugin_components_are_registered_with_their_distribution(example_plugin):
    registry = registry_module.get_registry()
    assert registry.get("data", "bars").source == "dkit-example"
    assert registry.get("metric", "moment_gap").source == "dkit-example"
    assert not registry.plugin_errors


def test_spec_using_the_example_plugin_runs(example_plugin, tmp_path):
    spec, document = load_spec(
        EXAMPLE / "specs" / "bars.yaml",
        ["train.steps=4", "sample.n=8", "sample.solver.steps=2",
         f"output.root={tmp_path / 'runs'}", "device=cpu", "network.channels=8"],
    )
    run = execute(spec, document, quiet=True)
    metrics = run.results["metrics"]
    assert {"mean_gap", "std_gap", "swd"} <= set(metrics)
    assert (run.dir / "samples.png").is_file()


def test_broken_plugin_is_reported_and_the_rest_still_work(tmp_path, monkeypatch, capsys,
                                                          fresh_registry):
    package = tmp_path / "src" / "dkit_broken_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs a library that is missing')\n")
    _fake_distribution(tmp_path / "site", "dkit-broken",
                       "[diffusers_kit]\nbroken = dkit_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    registry = registry_module.get_registry()
    assert "dkit-broken:broken" in registry.plugin_errors
    assert "needs a library that is missing" in registry.plugin_errors["dkit-broken:broken"]
    assert registry.get("process", "ve") is not None
    code, out, _ = run_cli(["plugins"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "dkit-broken:broken failed to load" in flat and "ve" in flat
    sys.modules.pop("dkit_broken_plugin", None)


def test_plugin_whose_hook_raises_is_reported(tmp_path, monkeypatch, fresh_registry):
    package = tmp_path / "src" / "dkit_raising_plugin.py"
    package.parent.mkdir(parents=True)
    package.write_text(textwrap.dedent("""
        from diffusers_kit import hookimpl

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "ve", object)  # clashes with the built-in
    """))
    _fake_distribution(tmp_path / "site", "dkit-raising",
                       "[diffusers_kit]\nraising = dkit_raising_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    registry = registry_module.get_registry()
    assert any("clashes" in e for e in registry.plugin_errors.values())
    assert registry.get("process", "ve").source == "diffusers_kit"
    sys.modules.pop("dkit_raising_plugin", None)


def test_plugins_table_and_show(capsys):
    code, out, _ = run_cli(["plugins"], capsys)
    assert code == 0
    for name in ("digits", "ve", "ncsn", "dsm", "annealed_langevin", "swd", "adam"):
        assert name in out
    code, out, _ = run_cli(["plugins", "show", "process", "ve"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    assert "sigma_max │ float │ 50.0 │ > 0" in flat
    assert "num_levels │ int │ 10 │ >= 2" in flat


def test_plugins_show_unknown_name_suggests(capsys):
    code, _, err = run_cli(["plugins", "show", "solver", "annealed_langevn"], capsys)
    assert code == 2
    assert "did you mean 'annealed_langevin'" in " ".join(err.split())

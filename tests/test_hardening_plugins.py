"""Plugin isolation (issue 14): a plugin that exits, raises or registers the wrong thing is
reported by name and leaves nothing behind; a life-cycle hook that raises does not stop a run
(exit status 5 afterwards), never a traceback."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from diffusers_kit import registry as registry_module
from diffusers_kit.hookspecs import hookimpl
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.processes.ve import VE
from diffusers_kit.registry import Registry
from tests.helpers import run_cli, write_spec


def install(tmp_path: Path, monkeypatch, module: str, source: str) -> None:
    """A distribution ``dkit-<module>`` announcing ``module`` in the diffusers_kit group."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / "site" / f"{module}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dkit-{module}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[diffusers_kit]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.fixture(autouse=True)
def fresh_registry():
    registry_module.reset_registry()
    yield
    registry_module.reset_registry()


@pytest.mark.parametrize("statement", ["import sys; sys.exit(3)", "raise SystemExit('bye')",
                                       "raise GeneratorExit()"])
def test_a_plugin_that_exits_on_import_is_reported_and_dkit_still_works(
        tmp_path, monkeypatch, capsys, statement):
    install(tmp_path, monkeypatch, "dkit_exits", statement + "\n")
    code, out, err = run_cli(["plugins"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "dkit-dkit_exits:dkit_exits failed to load" in flat and "ve" in flat
    code, out, err = run_cli(["validate", str(write_spec(tmp_path))], capsys)
    assert code == 0 and "is valid" in out


def test_a_plugin_that_fails_half_way_leaves_nothing_registered(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "dkit_half", """
        from diffusers_kit import hookimpl
        from diffusers_kit.processes.ve import VE

        class Shape:
            '''a new kind'''

        class Extra(VE):
            '''a component that would be orphaned'''

        @hookimpl
        def dkit_register(registry):
            registry.add_kind("shape", Shape, "shapes")
            registry.add("process", "ve_extra", Extra)
            raise RuntimeError("half-way")
    """)
    registry = registry_module.get_registry()
    assert registry.plugin_errors["dkit-dkit_half:dkit_half"] == "RuntimeError: half-way"
    assert "ve_extra" not in registry.kind("process").components
    assert "shape" not in registry.kinds
    assert registry.get("process", "ve").source == "diffusers_kit"


def test_a_component_not_deriving_from_its_kind_is_refused_at_registration(tmp_path,
                                                                           monkeypatch):
    install(tmp_path, monkeypatch, "dkit_wrong_base", """
        from diffusers_kit import hookimpl

        class NotAProcess:
            def __init__(self, scale: float = 1.0):
                self.scale = scale

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "not_a_process", NotAProcess)
    """)
    registry = registry_module.get_registry()
    error = registry.plugin_errors["dkit-dkit_wrong_base:dkit_wrong_base"]
    assert "does not derive from" in error and "NoiseProcess" in error
    assert "not_a_process" not in registry.kind("process").components


def test_factory_functions_must_declare_a_return_type_of_the_kind():
    registry = Registry()
    registry.add_kind("process", NoiseProcess)

    def undeclared(sigma_max: float = 2.0):  # type: ignore[no-untyped-def]
        return VE(sigma_max=sigma_max)

    def declared(sigma_max: float = 2.0) -> VE:
        return VE(sigma_max=sigma_max)

    with pytest.raises(TypeError, match="declare its return type"):
        registry.add("process", "undeclared", undeclared)
    with pytest.raises(TypeError, match="expected a class"):
        registry.add("process", "number", 3)  # type: ignore[arg-type]
    assert registry.add("process", "declared", declared).factory is declared
    assert registry.add("process", "ve", VE).factory is VE


class RaisingHooks:
    """A plugin whose life-cycle hooks all fail."""

    @hookimpl
    def dkit_run_started(self, run):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot reach the dashboard")

    @hookimpl
    def dkit_run_finished(self, run, metrics):  # type: ignore[no-untyped-def]
        raise SystemExit(9)


def test_a_hook_that_raises_is_reported_and_the_run_finishes_with_status_5(tmp_path, capsys):
    manager = registry_module.get_plugin_manager()
    plugin = RaisingHooks()
    manager.register(plugin, name="raising_hooks")
    try:
        code, out, err = run_cli(["run", str(write_spec(tmp_path)), "--quiet"], capsys)
    finally:
        manager.unregister(plugin)
    flat = " ".join(err.split())
    assert code == 5, flat
    assert "Traceback" not in out + err
    assert "plugin 'raising_hooks' failed in dkit_run_started: RuntimeError: cannot reach the " \
           "dashboard" in flat
    assert "failed in dkit_run_finished: SystemExit" in flat
    (run_dir,) = [p for p in (tmp_path / "runs" / "tiny").iterdir() if not p.is_symlink()]
    assert (run_dir / "checkpoint.safetensors").is_file(), "the trained model is kept"
    assert json.loads((run_dir / "metrics.json").read_text())["swd"] > 0

"""Plugin isolation (issue 14): a plugin that exits, raises or registers the wrong thing is
reported by name and leaves nothing behind; a life-cycle hook that raises does not stop a run
(exit status 5 afterwards), never a traceback."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusers_kit import registry as registry_module
from diffusers_kit.hookspecs import hookimpl
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.processes.ve import VE
from diffusers_kit.registry import Registry
from tests.helpers import TINY_SPEC as TINY
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


# -- issue 15: hook names checked, a plugin API version, the data kind's old name --------------
def test_a_misspelled_hook_is_reported_by_plugin_and_hook_and_the_rest_still_work(
        tmp_path, monkeypatch, capsys):
    """pluggy's check_pending: dkit_run_finish (for dkit_run_finished) would never be called;
    the plugin is named with the hook and its closest real name, and not loaded."""
    install(tmp_path, monkeypatch, "dkit_typo", """
        from diffusers_kit import hookimpl
        from diffusers_kit.processes.ve import VE

        class TypoVE(VE):
            '''registered by a plugin with a misspelled hook'''

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "typo_ve", TypoVE)

        @hookimpl
        def dkit_run_finish(run, metrics):
            pass
    """)
    (tmp_path / "other").mkdir()
    install(tmp_path / "other", monkeypatch, "dkit_future", """
        from diffusers_kit import hookimpl
        from diffusers_kit.processes.ve import VE

        class FutureVE(VE):
            '''registered by a plugin implementing a hook of a newer dkit, marked optional'''

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "future_ve", FutureVE)

        @hookimpl(optionalhook=True)
        def dkit_stage_finished(run, stage):
            pass
    """)
    registry = registry_module.get_registry()
    error = registry.plugin_errors["dkit-dkit_typo:dkit_typo"]
    assert "unknown hook 'dkit_run_finish' (did you mean 'dkit_run_finished'?)" in error
    assert "not loaded" in error
    assert "typo_ve" not in registry.kind("process").components
    assert registry.get("process", "future_ve").source == "dkit-dkit_future"
    assert registry.get("process", "ve").source == "diffusers_kit"
    assert not registry_module.get_plugin_manager().has_plugin("dkit_typo")
    code, out, _ = run_cli(["plugins"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    assert "dkit-dkit_typo:dkit_typo failed to load: implements unknown hook 'dkit_run_finish'" \
        in flat


@pytest.mark.parametrize(("required", "loads", "message"), [
    (">=1.0,<2", True, ""),  # a 1.0 plugin loads on 1.1: a minor version only adds
    (">=1.1,<2", True, ""),
    ("~=1.0", True, ""),
    ("==1.0", False, "requires the dkit plugin API ==1.0, and this dkit provides 1.1"),
    (">=2", False, "requires the dkit plugin API >=2, and this dkit provides 1.1"),
    ("<1.0", False, "requires the dkit plugin API <1.0"),
    ("one point oh", False, "is not a version specifier"),
])
def test_a_plugin_requires_a_plugin_api_version(tmp_path, monkeypatch, capsys, required, loads,
                                                message):
    from diffusers_kit.hookspecs import PLUGIN_API_VERSION

    assert PLUGIN_API_VERSION == "1.1"
    install(tmp_path, monkeypatch, "dkit_versioned", f"""
        from diffusers_kit import hookimpl
        from diffusers_kit.processes.ve import VE

        DKIT_PLUGIN_API = {required!r}

        class VersionedVE(VE):
            '''a process of a plugin that states its plugin API'''

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "versioned_ve", VersionedVE)
    """)
    registry = registry_module.get_registry()
    label = "dkit-dkit_versioned:dkit_versioned"
    if loads:
        assert label not in registry.plugin_errors
        assert registry.get("process", "versioned_ve").source == "dkit-dkit_versioned"
    else:
        assert message in registry.plugin_errors[label]
        assert "versioned_ve" not in registry.kind("process").components
        assert registry.get("process", "ve") is not None
    code, out, _ = run_cli(["plugins", "--kind", "process"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and 'plugin API 1.1 (a plugin module declares DKIT_PLUGIN_API = ">=1.1,<2")' \
        in flat
    if not loads:
        assert f"{label} failed to load" in flat


def test_the_old_kind_name_dataset_still_works_with_a_deprecation_message(tmp_path, monkeypatch,
                                                                         capsys):
    """The spec section is data:, so the kind is data; a plugin written for 'dataset' keeps
    working, warned, and dkit plugins says what to change."""
    install(tmp_path, monkeypatch, "dkit_old_kind", """
        import torch
        from diffusers_kit import Dataset, DataSplits, hookimpl

        class Line(Dataset):
            '''points on a line'''
            modality = "points"

            def load(self):
                x = torch.linspace(-1, 1, 200)[:, None].repeat(1, 2)
                return DataSplits(train=x[:150], heldout=x[150:])

        @hookimpl
        def dkit_register(registry):
            registry.add("dataset", "old_line", Line)
    """)
    with pytest.warns(DeprecationWarning, match=r"registry.add\('dataset', 'old_line'\): the "
                                                r"component kind 'dataset' is now 'data'"):
        registry = registry_module.get_registry()
    assert "dkit-dkit_old_kind:dkit_old_kind" not in registry.plugin_errors
    component = registry.get("data", "old_line")
    assert component.kind == "data" and component.source == "dkit-dkit_old_kind"
    with pytest.warns(DeprecationWarning, match="'dataset' is now 'data'"):
        assert registry.get("dataset", "old_line") is component
    with pytest.warns(DeprecationWarning):
        assert registry.build("dataset", {"kind": "old_line"}).load().train.shape == (150, 2)
    code, out, _ = run_cli(["plugins", "--kind", "data"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "old_line" in flat and "digits" in flat
    assert "deprecated: dkit-dkit_old_kind: registry.add('dataset', 'old_line'): the component " \
           "kind 'dataset' is now 'data'" in flat
    spec = write_spec(tmp_path, TINY_2D_SPEC.replace("{data}", "{kind: old_line}"))
    code, out, err = run_cli(["validate", str(spec), "--build"], capsys)
    assert code == 0, err


def test_a_registry_takes_the_old_kind_name_as_an_alias():
    from diffusers_kit.data.base import Dataset
    from diffusers_kit.data.toy2d import TwoMoons

    registry = Registry()
    with pytest.warns(DeprecationWarning, match="registry.add_kind\\('dataset'\\)"):
        registry.add_kind("dataset", Dataset)
    assert list(registry.kinds) == ["data"]
    registry.add("data", "two_moons", TwoMoons)
    with pytest.warns(DeprecationWarning, match="registry.kind\\('dataset'\\)"):
        assert registry.kind("dataset") is registry.kind("data")
    assert [c.name for c in registry.components("data")] == ["two_moons"]
    assert len(registry.deprecations) == 2


TINY_2D_SPEC = """\
name: tiny2d
seed: 0
device: cpu
data: {data}
process: {kind: vp}
network: {kind: mlp, width: 16, blocks: 1}
objective: {kind: dsm}
train: {steps: 2, batch_size: 16}
sample: {n: 8, solver: {kind: ddim, steps: 2}}
output: {root: {root}}
"""


# -- issue 29: os._exit at import, slow imports, networks of the wrong output shape -------------
def test_a_plugin_calling_os_exit_at_import_is_reported_and_dkit_still_works(
        tmp_path, monkeypatch, capsys):
    # before, os._exit(0) in a plugin's module ended every dkit command at once: exit 0, no output
    install(tmp_path, monkeypatch, "dkit_os_exit", "import os\nos._exit(0)\n")
    code, out, err = run_cli(["plugins"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "dkit-dkit_os_exit:dkit_os_exit failed to load" in flat and "os._exit(0)" in flat
    code, out, err = run_cli(["validate", str(write_spec(tmp_path))], capsys)
    assert code == 0 and "is valid" in out
    import os
    assert os._exit.__module__ == "posix"  # the real one is back after the imports


def test_a_plugin_calling_os_exit_while_registering_is_reported(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "dkit_os_exit_register", """
        import os
        from diffusers_kit import hookimpl

        @hookimpl
        def dkit_register(registry):
            os._exit(7)
    """)
    registry = registry_module.get_registry()
    error = registry.plugin_errors["dkit-dkit_os_exit_register:dkit_os_exit_register"]
    assert "os._exit(7)" in error
    assert registry.get("process", "ve").source == "diffusers_kit"


def test_a_slow_plugin_import_is_named_on_every_command_and_timed_by_dkit_plugins(
        tmp_path, monkeypatch, capsys):
    install(tmp_path, monkeypatch, "dkit_sleepy", "import time\ntime.sleep(0.3)\n")
    monkeypatch.setattr(registry_module, "SLOW_IMPORT_SECONDS", 0.2)
    monkeypatch.setattr("diffusers_kit.cli.plugins.SLOW_IMPORT_SECONDS", 0.2)
    code, out, err = run_cli(["validate", str(write_spec(tmp_path))], capsys)
    assert code == 0 and "is valid" in out
    notes = [line for line in err.splitlines() if line.startswith("note: plugin")]
    assert len(notes) == 1 and "dkit-dkit_sleepy:dkit_sleepy took" in notes[0], err
    seconds = float(notes[0].split(" took ")[1].split(" s ")[0])
    assert seconds >= 0.3
    registry_module.reset_registry()
    monkeypatch.delitem(sys.modules, "dkit_sleepy", raising=False)
    code, out, err = run_cli(["plugins"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "installed plugins" in flat
    assert "dkit-dkit_sleepy:dkit_sleepy" in flat and "(slow)" in flat and "loaded" in flat


TINY_SPEC_2D = """\
name: tiny2d
seed: 0
device: cpu
data: {kind: two_moons, n_train: 256, n_heldout: 64}
process: {kind: ve, sigma_min: 0.1, sigma_max: 4.0, num_levels: 4}
network: {kind: narrow}
objective: {kind: dsm}
train: {steps: 4, batch_size: 32, optimizer: {kind: adam, lr: 0.001}}
sample:
  n: 64
  solver: {kind: annealed_langevin, steps_per_level: 2}
evaluate: {metrics: [{kind: swd, projections: 16}]}
output: {root: "{root}"}
"""

NARROW_NETWORK = """
    import torch
    from diffusers_kit import hookimpl
    from diffusers_kit.networks.base import Network

    class Narrow(Network):
        '''returns one channel whatever the data has'''

        def __init__(self, data_shape: tuple[int, ...] = (2,)) -> None:
            super().__init__("eps")
            self.data_shape = tuple(data_shape)
            self.linear = torch.nn.Linear(self.data_shape[0] + 1, 1)

        def forward(self, x, t):
            return self.linear(torch.cat([x, t[:, None]], 1))

    @hookimpl
    def dkit_register(registry):
        registry.add("network", "narrow", Narrow)
"""


def test_a_network_of_the_wrong_output_shape_is_refused_before_training(
        tmp_path, monkeypatch, capsys):
    # a (B, 1) output for (B, 2) data broadcast through the loss: it trained and sampled
    install(tmp_path, monkeypatch, "dkit_narrow", NARROW_NETWORK)
    spec = write_spec(tmp_path, TINY_SPEC_2D)
    code, out, err = run_cli(["validate", str(spec)], capsys)
    message = " ".join((out + err).split())
    assert code == 2, message
    assert "network.kind" in message and "Narrow returned (2, 1)" in message
    assert "(2, 2)" in message and "Traceback" not in message
    code, out, err = run_cli(["run", str(spec)], capsys)
    assert code == 2 and not (tmp_path / "runs").exists()


def test_a_score_model_refuses_a_network_output_of_another_shape():
    from diffusers_kit.model import NetworkOutputError, ScoreModel
    from diffusers_kit.networks.base import Network

    class Narrow(Network):
        def __init__(self, learned_variance: bool = False) -> None:
            super().__init__("eps", learned_variance)

        def forward(self, x, t):  # one channel; with learned variance, the channels twice
            return torch.cat([x, x], 1) if self.learned_variance else x[:, :1]

    model = ScoreModel(VE(), Narrow())
    with pytest.raises(NetworkOutputError, match=r"shape \(3, 1\).*must return shape \(3, 2\)"):
        model(torch.zeros(3, 2), torch.full((3,), 0.5))
    # a learned-variance network returns twice the channels: (3, 2) for (3, 1) data is right
    assert ScoreModel(VE(), Narrow(True))(torch.zeros(3, 1), torch.full((3,), 0.5)).shape == (3, 2)


def test_an_option_error_names_the_option_and_its_line(tmp_path, monkeypatch, capsys):
    """Plugin API 1.1: a constructor's OptionError is reported on that option's field and YAML
    line (a plugin's as a built-in's); a plain ValueError stays on the component's mapping."""
    install(tmp_path, monkeypatch, "dkit_picky", """
        from diffusers_kit import OptionError, hookimpl
        from diffusers_kit.processes.ve import VE

        DKIT_PLUGIN_API = ">=1.1,<2"

        class PickyVE(VE):
            '''a VE that wants sigma_max at least 100 sigma_min'''

            def __init__(self, sigma_min: float = 0.01, sigma_max: float = 8.0,
                         num_levels: int = 4, plain: bool = False) -> None:
                if sigma_max < 100 * sigma_min:
                    if plain:
                        raise ValueError("sigma_max must be at least 100 sigma_min")
                    raise OptionError("sigma_max", f"at least 100 sigma_min ({100 * sigma_min})",
                                      sigma_max)
                super().__init__(sigma_min=sigma_min, sigma_max=sigma_max,
                                 num_levels=num_levels)

        @hookimpl
        def dkit_register(registry):
            registry.add("process", "picky_ve", PickyVE)
    """)
    block = "  kind: ve\n  sigma_min: 0.01\n  sigma_max: 8.0\n"
    solvers = {"clip_x0": "{kind: heun, steps: 4, form: noise, clip_x0: 1.0}",
               "levels": "{kind: consistency, steps: 3, levels: [1.0]}"}
    cases = (  # the process block or solver, the field named, the line it names, the words
        ("  kind: picky_ve\n  sigma_min: 0.01\n  sigma_max: 0.5\n", "process.sigma_max",
         "  sigma_max: 0.5", "expected at least 100 sigma_min (1.0) ('picky_ve'); given 0.5"),
        ("  kind: picky_ve\n  plain: true\n  sigma_min: 0.01\n  sigma_max: 0.5\n", "process",
         "process:", "sigma_max must be at least 100 sigma_min"),
        ("clip_x0", "sample.solver.clip_x0", "  solver:",  # built-in solvers raise it too
         "expected null with form: noise"),
        ("levels", "sample.solver.levels", "  solver:", "of them for steps: 3 ('consistency'); "
         "given [1.0]"),
    )
    for change, field, row, words in cases:
        text = TINY.replace(block, change) if change not in solvers else TINY.replace(
            "{kind: annealed_langevin, steps_per_level: 2, epsilon: 5.0e-5}", solvers[change])
        line = next(i for i, r in enumerate(text.splitlines(), 1) if r.startswith(row))
        spec = tmp_path / "picky.yaml"
        spec.write_text(text.replace("{root}", str(tmp_path / "runs")))
        code, _, err = run_cli(["validate", str(spec)], capsys)
        flat = " ".join(err.split())
        assert code == 2 and "Traceback" not in err, err
        assert f"picky.yaml:{line} {field}: expected" in flat and words in flat, (field, flat)

"""The layers contract of pyproject.toml (import-linter): it covers every module, and it fails
when a component imports the run machinery, so the import cycle cannot come back unnoticed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
# modules outside every layer: the package's own __init__ files, which only re-export (the
# root one is the public API; spec/__init__ gathers the spec layer's functions)
UNLAYERED = {"diffusers_kit", "diffusers_kit.spec"}


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = config["tool"]["importlinter"]["contracts"]
    out = []
    for layer in contract["layers"]:
        separator = "|" if "|" in layer else ":"
        out.append([name.strip() for name in layer.split(separator)])
    return out


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "diffusers_kit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_every_module_is_in_a_layer() -> None:
    layered = [name for layer in _layers() for name in layer]
    assert len(layered) == len(set(layered)), "a module is named in two layers"
    outside = [module for module in _modules() if module not in UNLAYERED and not any(
        module == name or module.startswith(name + ".") for name in layered)]
    assert outside == [], f"modules in no layer of pyproject.toml: {outside}"


def _lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, text=True,
                          capture_output=True, env={"PYTHONPATH": str(package_parent),
                                                    "PATH": "/usr/bin:/bin"}, timeout=300)


def test_contract_fails_on_a_component_importing_the_run_layer(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "diffusers_kit", tmp_path / "diffusers_kit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    fd = tmp_path / "diffusers_kit" / "metrics" / "fd.py"
    fd.write_text(fd.read_text(encoding="utf-8") + "\nimport diffusers_kit.run  # noqa\n",
                  encoding="utf-8")
    broken = _lint(tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "BROKEN" in broken.stdout
    assert "diffusers_kit.metrics.fd -> diffusers_kit.run" in broken.stdout

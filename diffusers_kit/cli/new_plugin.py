"""``dkit new-plugin NAME [--kind KIND ...] [--dir PATH]``: scaffold a plugin distribution.

It writes, into a new folder, everything a third party needs to ship components to dkit:
``pyproject.toml`` with the ``diffusers_kit`` entry point, ``src/<package>/__init__.py`` with
the ``dkit_register`` hook (and ``DKIT_PLUGIN_API``), one small but working component per
requested kind, ``tests/test_<package>.py`` running :mod:`diffusers_kit.testing` on each, a
``README.md`` and ``specs/example.yaml`` using the components. The files come from the
templates in ``diffusers_kit/cli/templates/new_plugin/`` (``{{name}}`` placeholders).

The folder is written next to its final place and renamed into it at the end, so a failure
leaves no half-written plugin behind.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import keyword
import re
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from diffusers_kit import __version__
from diffusers_kit.cli.main import UsageError
from diffusers_kit.cli.plugins import api_requirement
from diffusers_kit.console import make_console
from diffusers_kit.hookspecs import PLUGIN_API_VERSION
from diffusers_kit.registry import KIND_ALIASES  # an old kind name (dataset) is taken here too


@dataclass(frozen=True)
class Example:
    """The example component a kind gets: its module, class, name suffix and what it is."""

    module: str
    cls: str
    suffix: str
    summary: str


EXAMPLES = {
    "process": Example("process", "LinearLogSNR", "linear_log_snr",
                       "a variance-preserving noise process whose log-SNR falls linearly in t"),
    "solver": Example("solver", "EulerMaruyamaSDE", "euler_maruyama",
                      "Euler-Maruyama on the reverse-time SDE, ending with a denoising step"),
    "metric": Example("metric", "MeanDistance", "mean_distance",
                      "the distance between the means of the samples and of held-out data"),
    "data": Example("data", "Ring", "ring", "points on a noisy ring in the plane"),
    "forward_model": Example("forward_model", "PairSums", "pair_sums",
                             "a measurement operator: sums of neighbouring pairs of entries"),
    "guidance": Example("guidance", "Attract", "attract",
                        "a guidance term pulling every entry towards a target value"),
    "network": Example("network", "TinyMLP", "tiny_mlp",
                       "a small residual MLP with sinusoidal time features"),
    "objective": Example("objective", "UniformLogSNR", "uniform_log_snr",
                         "the eps loss at times drawn uniformly in log-SNR"),
}
DEFAULT_KINDS = ("solver",)

# PEP 508 / packaging's rule for a distribution name
MAX_PLUGIN_NAME = 100  # well below a file system's 255 bytes, with room for "test_<name>.py"
DISTRIBUTION_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
TEMPLATES = "templates/new_plugin"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "new-plugin", help="scaffold a plugin distribution (components, tests, spec)",
        description="Write a new plugin distribution: pyproject.toml with the diffusers_kit "
                    "entry point, one working example component per --kind, tests using "
                    "diffusers_kit.testing, a README and specs/example.yaml.")
    parser.add_argument("name", help="the distribution's name, e.g. dkit-wavelets (its Python "
                                     "package: dkit_wavelets)")
    parser.add_argument("--kind", action="append", metavar="KIND", dest="kinds",
                        help=f"a component to include (repeatable): {', '.join(EXAMPLES)}; "
                             f"default: {', '.join(DEFAULT_KINDS)}")
    parser.add_argument("--dir", metavar="PATH",
                        help="the folder to create (default: ./NAME); it must not exist or be "
                             "empty")
    parser.set_defaults(func=new_plugin_command)


def package_name(name: str) -> str:
    """The Python package of distribution ``name`` (normalised: ``dkit-Foo.bar`` ->
    ``dkit_foo_bar``), after checking both; a ``UsageError`` says what is wrong."""
    if len(name) > MAX_PLUGIN_NAME:  # it names a folder, a package and files inside them
        raise UsageError(f"new-plugin: a name of at most {MAX_PLUGIN_NAME} characters (it "
                         f"names the plugin's folder, package and files); given {len(name)}")
    if not DISTRIBUTION_NAME.match(name):
        raise UsageError(f"new-plugin: {name!r} is not a distribution name: use letters, "
                         "digits, '-', '_' and '.', starting and ending with a letter or digit "
                         "(e.g. dkit-wavelets)")
    package = re.sub(r"[-_.]+", "_", name).lower()
    if not package.isidentifier() or keyword.iskeyword(package):
        raise UsageError(f"new-plugin: {name!r} gives the Python package name {package!r}, "
                         "which is not an identifier (it must not start with a digit or be a "
                         "Python keyword)")
    if package in ("diffusers_kit", "dkit"):
        raise UsageError(f"new-plugin: the package name {package!r} is taken by dkit: choose "
                         "another name (e.g. dkit-<what it adds>)")
    if package in sys.stdlib_module_names:
        raise UsageError(f"new-plugin: the package name {package!r} is taken by the standard "
                         "library: choose another name")
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin not in (None, "namespace"):  # a bare folder is no clash
        raise UsageError(f"new-plugin: a module named {package!r} is already importable here, "
                         "and the plugin's package would clash with it: choose another name")
    return package


def requested_kinds(kinds: list[str] | None) -> list[str]:
    """The kinds asked for, in the order of :data:`EXAMPLES`, each once."""
    wanted = set()
    for kind in kinds or DEFAULT_KINDS:
        kind = KIND_ALIASES.get(kind, kind)
        if kind not in EXAMPLES:
            raise UsageError(f"new-plugin: --kind {kind!r} is not a kind with an example; "
                             f"expected one of {', '.join(EXAMPLES)}")
        wanted.add(kind)
    return [kind for kind in EXAMPLES if kind in wanted]


def target_folder(name: str, folder: str | None) -> Path:
    """Where the plugin goes, refused when something is already there."""
    path = Path(folder).expanduser() if folder else Path.cwd() / name
    if path.exists() and not path.is_dir():
        raise UsageError(f"new-plugin: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"new-plugin: {path} exists and is not empty; choose another --dir "
                         "(nothing was written)")
    return path


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{{key}}`` replaced by ``values[key]``."""
    def replace(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", replace, template)


def python_list(head: str, items: list[str], opening: str = "[", closing: str = "]") -> str:
    """``head`` + the sorted ``items`` on one line of at most 100 characters, else one item a
    line (how ruff formats an import or a list: generated files stay lint-clean)."""
    items = sorted(items)
    line = f"{head}{opening}{', '.join(items)}{closing}"
    if len(line) <= 100:
        return line if opening == "[" else f"{head}{', '.join(items)}"
    return head + opening + "\n" + "".join(f"    {item},\n" for item in items) + closing


def read_template(relative: str) -> str:
    """A template's text (package data, wherever dkit is installed, zip included)."""
    resource = importlib.resources.files("diffusers_kit.cli")
    for part in f"{TEMPLATES}/{relative}".split("/"):
        resource = resource.joinpath(part)
    return resource.read_text(encoding="utf-8")


def example_spec(prefix: str, kinds: list[str]) -> str:
    """A spec that runs the plugin's components, with built-in ones for the rest."""
    def pick(kind: str, own: str, builtin: str) -> str:
        return own if kind in kinds else builtin

    lines = [
        "# yaml-language-server: $schema=dkit.schema.json",
        "# (dkit schema -o specs/dkit.schema.json writes that file: completion in an editor)",
        "#",
        "# This plugin's components on 2-D points, with built-in ones where it has none.",
        "# Small enough for a CPU: dkit run specs/example.yaml",
        f"name: {prefix}_example",
        "seed: 0",
        pick("data", f"data: {{kind: {prefix}_ring}}",
             "data: {kind: two_moons, n_train: 8000, n_heldout: 2000}"),
        pick("process", f"process: {{kind: {prefix}_linear_log_snr}}", "process: {kind: vp}"),
        pick("network", f"network: {{kind: {prefix}_tiny_mlp, width: 128}}",
             "network: {kind: mlp, width: 128, blocks: 3}"),
        pick("objective", f"objective: {{kind: {prefix}_uniform_log_snr}}",
             "objective: {kind: dsm, times: uniform}"),
        "train: {steps: 3000, batch_size: 256, optimizer: {kind: adam, lr: 0.002},",
        "        ema_decay: 0.995, log_every: 200}",
        "sample:",
        "  n: 2000",
        pick("solver", f"  solver: {{kind: {prefix}_euler_maruyama, steps: 500}}",
             "  solver: {kind: ddim, steps: 50}"),
    ]
    if "guidance" in kinds:
        lines += ["  # pulls every coordinate towards 0.5: the samples leave the data on purpose",
                  f"  guidance: [{{kind: {prefix}_attract, target: 0.5, tolerance: 1.0}}]"]
    if "forward_model" in kinds:
        lines += ["restore:   # measure held-out points through the operator, restore them",
                  f"  method: {{kind: replacement, operator: {{kind: {prefix}_pair_sums, "
                  "sigma_y: 0.05}}",
                  "  n: 8"]
    metrics = ["{kind: swd}"]
    if "metric" in kinds:
        metrics.append(f"{{kind: {prefix}_mean_distance}}")
    lines += ["evaluate:", f"  metrics: [{', '.join(metrics)}]", ""]
    return "\n".join(lines)


def scaffold(name: str, kinds: list[str], folder: Path) -> list[Path]:
    """Write the plugin ``name`` with the example components of ``kinds`` into ``folder``
    (checked beforehand); returns the files written, relative to it."""
    package = package_name(name)
    prefix = package.removeprefix("dkit_") or package
    examples = [EXAMPLES[kind] for kind in kinds]
    values = {
        "distribution": name,
        "package": package,
        "prefix": prefix,
        "entry_point": prefix,
        "api": api_requirement(),
        "api_version": PLUGIN_API_VERSION,
        "dkit_version": __version__,
        "summary": "; ".join(e.summary for e in examples),
        "kind_options": "".join(f" --kind {kind}" for kind in kinds),
        "first_kind": kinds[0],
        "first_name": f"{prefix}_{examples[0].suffix}",
    }
    files: dict[str, str] = {}
    values["imports"] = "\n".join(f"from {package}.{e.module} import {e.cls}"
                                  for e in sorted(examples, key=lambda e: e.module))
    values["registrations"] = "\n".join(
        f'    registry.add("{kind}", "{prefix}_{e.suffix}", {e.cls})'
        for kind, e in zip(kinds, examples, strict=True))
    values["exports"] = python_list("__all__ = ", [f'"{e.cls}"' for e in examples])
    values["components"] = textwrap.fill(
        "Components: " + "; ".join(f"{e.cls} ({kind}), {e.summary}"
                                   for kind, e in zip(kinds, examples, strict=True)) + ".",
        width=96)
    values["table"] = "\n".join(
        f"| {kind} | `{prefix}_{e.suffix}` | `{e.cls}` ({e.module}.py) | {e.summary} |"
        for kind, e in zip(kinds, examples, strict=True))
    files["pyproject.toml"] = render(read_template("pyproject.toml.tmpl"), values)
    files["README.md"] = render(read_template("README.md.tmpl"), values)
    files[f"src/{package}/__init__.py"] = render(read_template("plugin.py.tmpl"), values)
    for e in examples:
        files[f"src/{package}/{e.module}.py"] = render(
            read_template(f"components/{e.module}.py.tmpl"), values)
    tests = [render(read_template("tests/header.py.tmpl"), {
        **values, "imports": python_list(f"from {package} import ", [e.cls for e in examples],
                                         "(", ")")})]
    parts = [*kinds, *(["process_solver"] if {"process", "solver"} <= set(kinds) else [])]
    tests += [render(read_template(f"tests/{part}.py.tmpl"), values) for part in parts]
    files[f"tests/test_{package}.py"] = "".join(tests)
    files["specs/example.yaml"] = example_spec(prefix, kinds)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if folder.is_dir():  # an empty folder: replaced by the complete one
            folder.rmdir()
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [Path(relative) for relative in files]


def new_plugin_command(args: argparse.Namespace) -> int:
    kinds = requested_kinds(args.kinds)
    package_name(args.name)  # checked before the folder, which is named after it
    folder = target_folder(args.name, args.dir)
    written = scaffold(args.name, kinds, folder)
    console = make_console()
    console.print(f"[green]created[/] {escape(str(folder))}: plugin {escape(args.name)!r} with "
                  f"{', '.join(kinds)}", soft_wrap=True)
    for path in sorted(written):
        console.print(f"  {escape(str(path))}", highlight=False)
    console.print(f"next: cd {escape(str(folder))} && pip install -e . && pytest && dkit "
                  "validate specs/example.yaml", soft_wrap=True, highlight=False)
    return 0

"""A run folder's layout: the files a run writes, its record, ``latest``, locks.

``<root>/<name>/<timestamp>/`` holds the resolved ``spec.yaml``, ``checkpoint.safetensors``,
``run.json`` (status ``running`` / ``finished`` / ``failed`` / ``interrupted``, the training
hash, the step reached, the models used), ``samples.npz`` and the log; ``<root>/<name>/latest``
points to the newest finished run (a symlink, or a one-line file where the OS has no
symlinks); ``<root>/.locks/`` holds one lock per training hash being built.

A leaf module: spec validation reads run folders through it (a reference to a run), the run
layer writes them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from diffusers_kit.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from rich.console import Console

RUN_RECORD = "run.json"
ALIVE = ".alive"
LATEST = "latest"
CHECKPOINT = "checkpoint.safetensors"
SPEC_FILE = "spec.yaml"
SAMPLES = "samples.npz"
METRICS = "metrics.json"
STATUSES = ("running", "finished", "failed", "interrupted")


class RunFolderGone(FileNotFoundError):
    """The run's folder disappeared while the run was writing to it: the run stops rather than
    recreate a folder holding part of a run (exit status 3, the environment)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(errno.ENOENT, "the run folder was removed while the run was writing "
                         "to it; the run stopped and recreated nothing", str(folder))


def check_folder(folder: Path | None) -> None:
    """Raise :class:`RunFolderGone` when the run folder ``folder`` no longer exists."""
    if folder is not None and not folder.is_dir():
        raise RunFolderGone(folder)


def read_record(folder: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder (None when absent or unreadable)."""
    try:
        return json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (a reader never sees half of it)."""
    write_json(folder / RUN_RECORD, record)


def finite(value: Any) -> Any:
    """``value`` as plain JSON data with NaN and infinity as None (they are not JSON; a figure
    that is not finite reads back as null) and anything else unknown as its string."""
    return json.loads(json.dumps(value, default=str), parse_constant=lambda _: None)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON (:func:`finite`, indented) atomically: the one JSON writer of a
    run folder (``run.json``, ``metrics.json``)."""
    text = json.dumps(finite(value), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_spec(folder: Path) -> Any:
    """The resolved spec a run folder holds (``spec.yaml``, parsed); OSError or
    yaml.YAMLError when it is missing or unreadable."""
    return yaml.safe_load((folder / SPEC_FILE).read_text(encoding="utf-8"))


def write_spec(folder: Path, resolved: dict[str, Any]) -> None:
    """Write the run's resolved spec (every default filled in) as ``spec.yaml``."""
    (folder / SPEC_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def write_samples(folder: Path, samples: np.ndarray, display: np.ndarray,
                  labels: np.ndarray | None = None) -> None:
    """``samples.npz``: ``samples`` (model space), ``display`` (the data set's display space)
    and, when labels were drawn, ``labels``: what ``dkit evaluate`` reads back."""
    arrays = {"samples": samples, "display": display}
    if labels is not None:
        arrays["labels"] = labels
    np.savez_compressed(folder / SAMPLES, **arrays)


def follow_latest(folder: Path) -> Path:
    """``<root>/<name>/latest`` -> the run folder it points to (symlink or one-line file)."""
    if folder.name == LATEST and folder.is_file() and not folder.is_symlink():
        target = folder.read_text(encoding="utf-8").strip()
        return folder.parent / target
    return folder.resolve() if folder.is_symlink() else folder


def point_latest(folder: Path) -> None:
    """Make ``<root>/<name>/latest`` point to ``folder`` (atomically replaced)."""
    link = folder.parent / LATEST
    tmp = folder.parent / f".{LATEST}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(folder.name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):
        tmp.write_text(folder.name + "\n", encoding="utf-8")
    os.replace(tmp, link)


def run_folders(root: Path, name: str | None = None) -> list[Path]:
    """Run folders under ``root`` (of one spec name, or all), oldest first."""
    if not root.is_dir():
        return []
    groups = [root / name] if name else sorted(p for p in root.iterdir() if p.is_dir()
                                               and not p.name.startswith("."))
    found = []
    for group in groups:
        if not group.is_dir() or group.is_symlink():
            continue
        for folder in sorted(group.iterdir()):
            if (folder.is_dir() and not folder.is_symlink() and folder.name != LATEST
                    and not folder.name.startswith(".")):
                found.append(folder)
    return found


def find_finished(root: Path, digest: str) -> Path | None:
    """The newest run under ``root`` whose training hash is ``digest`` and whose training
    finished, with its checkpoint in place: a finished run, or one whose train stage finished
    (``train_finished`` in its record) before a later stage failed or was interrupted."""
    best: tuple[str, Path] | None = None
    for folder in run_folders(root):
        record = read_record(folder)
        if not record or record.get("train_hash") != digest or not record.get("trained", True):
            continue
        done = record.get("status") == "finished" or bool(record.get("train_finished"))
        if done and (folder / CHECKPOINT).is_file():
            key = str(record.get("finished") or record.get("train_finished") or "")
            if best is None or key >= best[0]:
                best = (key, folder)
    return best[1] if best else None


@contextlib.contextmanager
def build_lock(root: Path, digest: str, console: Console | None = None,
               what: str = "") -> Iterator[None]:
    """Hold an exclusive lock for building the model with hash ``digest`` under ``root``.

    A second process that needs the same model waits here, then finds the finished run.
    The lock lives in ``<root>/.locks/`` and is released by the OS if the holder dies.
    """
    folder = root / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{digest[:32]}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): builds are not serialised
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if console is not None:
                console.print(f"waiting for another dkit that is building {what or digest[:12]}",
                              soft_wrap=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def alive_marker(folder: Path) -> Iterator[None]:
    """Hold a lock on ``folder/.alive`` while a run executes, so that ``dkit runs`` can tell a
    running run from one that was killed (its record still says running, but nobody holds it)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    marker = folder / ALIVE
    with open(marker, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # left behind only by a killed process
                marker.unlink()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def live_status(folder: Path, record: dict[str, Any] | None) -> str:
    """The status to show: a record saying ``running`` whose process is gone is interrupted."""
    if record is None:
        return "unknown"
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    try:
        import fcntl
    except ImportError:
        return status
    if not (folder / ALIVE).exists():
        return "interrupted"
    try:
        with open(folder / ALIVE, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except BlockingIOError:
        return "running"
    except OSError:
        return status
    return "interrupted"


def unique_folder(parent: Path, stem: str) -> Path:
    """Create and return a new folder ``parent/<stem>`` (or ``<stem>-2``, ``-3``, ...).

    ``mkdir`` without ``exist_ok`` is the test, so two commands started in the same second get
    two folders, never one folder written by both. A ``parent`` that is a symbolic link is
    refused (``FileExistsError``): nothing is written outside the folder a message names."""
    if parent.is_symlink():
        raise FileExistsError(errno.EEXIST, "a symbolic link where dkit writes its output "
                              f"folders (to {os.readlink(parent)}); nothing is written through "
                              "it: remove the link", str(parent))
    parent.mkdir(parents=True, exist_ok=True)
    for copy in range(1, 10_001):
        candidate = parent / (stem if copy == 1 else f"{stem}-{copy}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free folder name {stem}-N under {parent}")


@contextlib.contextmanager
def output_folder(parent: Path, stem: str) -> Iterator[Path]:
    """A command's output folder (:func:`unique_folder`), removed again, with the folders
    created for it, when the command fails or is interrupted: a failed command leaves no folder
    holding part of its output."""
    created = []
    probe = parent
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    folder = unique_folder(parent, stem)
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for empty in created:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")

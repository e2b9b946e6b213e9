"""A run folder's layout: the files a run writes, its record, ``latest``, locks.

``<root>/<name>/<timestamp>/`` holds the resolved ``spec.yaml``, ``checkpoint.safetensors``,
``run.json`` (status ``running`` / ``finished`` / ``failed`` / ``interrupted``, the training
hash, the step reached, the models used), ``samples.npz`` and the log; ``<root>/<name>/latest``
points to the newest finished run (a symlink, or a one-line file where the OS has no
symlinks); ``<root>/.locks/`` holds one lock per training hash being built and ``.alive`` in a
run folder is held while the run executes: both :class:`FileLock` files (create-exclusive, with
a heartbeat; safe on shared filesystems, taken over when their holder died).

A leaf module: spec validation reads run folders through it (a reference to a run), the run
layer writes them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from diffusers_kit.checkpoint import atomic_write_bytes
from diffusers_kit.spec.errors import SpecError, SpecIssue

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


def newest_run(folder: Path) -> list[str]:
    """What a refusal of ``folder`` as a run folder suggests: ``[<folder>/latest]`` where
    ``folder`` is a spec's runs folder (it holds ``latest``), else nothing."""
    if folder.name != LATEST and (folder / LATEST).exists():
        return [str(folder / LATEST)]
    return []


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


#: seconds a held lock may go without a heartbeat before another process may take it over
#: (the environment variable ``DKIT_LOCK_TIMEOUT`` overrides it, in seconds); the clocks of the
#: machines sharing a run root must agree to well within it
LOCK_TIMEOUT = 60.0
#: seconds between two heartbeats of a held lock
LOCK_HEARTBEAT = 5.0
#: seconds between two looks at a lock someone else holds
LOCK_POLL = 0.5


def lock_timeout(environ: Mapping[str, str] | None = None) -> float:
    """The stale-lock timeout: ``DKIT_LOCK_TIMEOUT`` (seconds) when set, else
    :data:`LOCK_TIMEOUT`. A value that is not a positive number is a user error naming it."""
    text = (os.environ if environ is None else environ).get("DKIT_LOCK_TIMEOUT", "").strip()
    if not text:
        return LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SpecError([SpecIssue(("DKIT_LOCK_TIMEOUT",), "a positive number of seconds "
                                   "(a lock whose heartbeat is older is taken over)", text,
                                   None, "environment")])
    return value


def _pid_dead(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (a zombie counts as dead: it holds
    nothing). Where that cannot be asked without harm (Windows: ``os.kill`` there terminates)
    the answer is False and only the heartbeat decides."""
    if os.name == "nt" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    with contextlib.suppress(OSError, IndexError):  # Linux: a killed child not yet reaped
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] in "ZX"
    return False


class FileLock:
    """An exclusive lock that works on shared filesystems (NFS and the like, where advisory
    ``flock`` locks are unreliable) and outlives no crash.

    The lock is the file ``path``, created with ``O_CREAT | O_EXCL`` (atomic on NFS v3+ and
    local filesystems): whoever creates it holds it. It holds JSON: the holder's ``host``,
    ``pid``, ``started`` and ``heartbeat`` (Unix times) and a random ``token``; a daemon
    thread rewrites it (atomically, by rename) every ``heartbeat`` seconds while held. A waiter
    polls every ``poll`` seconds. A lock is **stale** when its holder runs on this host and its
    process is gone, or when its heartbeat is older than ``timeout`` seconds (any host; also a
    file that cannot be read as a lock, judged by its modification time). A stale lock is taken
    over under a short guard file ``path + ".takeover"`` (itself created with ``O_EXCL``): the
    taker checks that the lock still holds the stale token, removes it and creates its own with
    ``O_EXCL``, so of several takers racing for one stale lock exactly one wins; ``say`` is told
    whose lock was taken over. :meth:`release` (leaving the ``with`` block, by return or
    exception) stops the heartbeat and removes the file if it is still this holder's.
    """

    def __init__(self, path: Path, *, what: str = "", say: Callable[[str], None] | None = None,
                 timeout: float | None = None, heartbeat: float | None = None,
                 poll: float = LOCK_POLL) -> None:
        self.path = Path(path)
        self.what = what or self.path.name
        self.say = say
        self.timeout = lock_timeout() if timeout is None else float(timeout)
        self.heartbeat = (min(LOCK_HEARTBEAT, self.timeout / 4) if heartbeat is None
                          else float(heartbeat))
        self.poll = poll
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = Path(f"{self.path}.takeover")

    # -- reading a lock ----------------------------------------------------------------------
    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """The lock file's content, ``{}`` when it exists but is not a lock's JSON (being
        written, damaged), None when there is no lock."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            content = json.loads(text)
        except ValueError:
            return {}
        return content if isinstance(content, dict) else {}

    def stale_reason(self, content: dict[str, Any], now: float | None = None) -> str | None:
        """Why the lock holding ``content`` is stale, or None when its holder may be alive."""
        now = time.time() if now is None else now
        if content.get("host") == socket.gethostname() and isinstance(content.get("pid"), int) \
                and _pid_dead(content["pid"]):
            return "its process is gone"
        beat = content.get("heartbeat")
        if not isinstance(beat, (int, float)):
            try:  # not (yet) a lock's JSON: its age is the file's
                beat = self.path.stat().st_mtime
            except OSError:
                return None
        age = now - float(beat)
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s (more than {self.timeout:g} s)"
        return None

    @staticmethod
    def holder(content: dict[str, Any]) -> str:
        """``host pid N since TIME``, what a message says of a lock's holder."""
        if not content.get("host"):
            return "an unknown holder (the file is not a lock's JSON)"
        since = content.get("started")
        when = (datetime.fromtimestamp(since).isoformat(timespec="seconds")
                if isinstance(since, (int, float)) else "?")
        return f"{content['host']} pid {content.get('pid')} since {when}"

    # -- taking and giving back ---------------------------------------------------------------
    def _content(self, started: float) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                           "heartbeat": now, "token": self.token}).encode()

    def _create(self, path: Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _try(self) -> bool:
        """One attempt: create the lock, or take over a stale one; True when held."""
        self.token = uuid.uuid4().hex
        self._started = time.time()
        if self._create(self.path, self._content(self._started)):
            return True
        content = self.read(self.path)
        if content is None:  # released between the two looks: try again at once
            return self._create(self.path, self._content(self._started))
        reason = self.stale_reason(content)
        if reason is None:
            return False
        return self._take_over(content, reason)

    def _take_over(self, content: dict[str, Any], reason: str) -> bool:
        guard = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "heartbeat": time.time()}).encode()
        if not self._create(self._guard, guard):
            self._clear_stale_guard()
            return False
        try:
            now = self.read(self.path)
            if now is not None and now.get("token") != content.get("token"):
                return False  # someone else took it over first (or it changed hands)
            if now is not None and self.stale_reason(now) is None:
                return False  # its heartbeat came back
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            won = self._create(self.path, self._content(self._started))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._guard)
        if won and self.say is not None:
            self.say(f"took over the lock of {self.what} from {self.holder(content)}: {reason} "
                     f"({self.path})")
        return won

    def _clear_stale_guard(self) -> None:
        """A taker that died inside its takeover leaves the guard: gone after ``timeout``."""
        with contextlib.suppress(OSError):
            if time.time() - self._guard.stat().st_mtime > self.timeout:
                os.unlink(self._guard)

    def acquire(self, wait: float | None = None) -> bool:
        """Take the lock, waiting at most ``wait`` seconds (None: as long as it takes); True
        when held. The first wait is announced through ``say``, with the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if wait is None else time.monotonic() + wait
        announced = False
        while not self._try():
            if deadline is not None and time.monotonic() >= deadline:
                self.token = None
                return False
            if not announced and self.say is not None:
                content = self.read(self.path) or {}
                self.say(f"waiting for {self.what}, held by {self.holder(content)} "
                         f"({self.path})")
                announced = True
            time.sleep(self.poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"dkit lock {self.what}",
                                        daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            content = self.read(self.path)
            if content is None or content.get("token") != self.token:
                return  # taken over (this process was judged dead): nothing of ours to keep
            tmp = Path(f"{self.path}.{self.token}.tmp")
            with contextlib.suppress(OSError):
                tmp.write_bytes(self._content(self._started))
                os.replace(tmp, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if this holder still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        content = self.read(self.path)
        if content is not None and self.token is not None and content.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.token = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def build_lock(root: Path, digest: str, console: Console | None = None,
               what: str = "") -> Iterator[None]:
    """Hold an exclusive lock for building the model with hash ``digest`` under ``root``.

    A second process that needs the same model waits here, then finds the finished run. The
    lock is the file ``<root>/.locks/<digest[:32]>.lock`` (:class:`FileLock`): safe on a shared
    filesystem, taken over with a message when its holder died or stopped beating.
    """
    say = None
    if console is not None:
        def say(text: str) -> None:
            console.print(text, soft_wrap=True, markup=False, highlight=False)
    lock = FileLock(root / ".locks" / f"{digest[:32]}.lock",
                    what=f"another dkit building {what or digest[:12]}", say=say)
    with lock:
        yield


@contextlib.contextmanager
def alive_marker(folder: Path) -> Iterator[None]:
    """Hold ``folder/.alive`` (a :class:`FileLock`) while a run executes, so that ``dkit runs``
    can tell a running run from one that was killed (its record still says running, but the
    marker's holder is gone: :func:`live_status`)."""
    with FileLock(folder / ALIVE, what=f"the run in {folder}"):
        yield


def live_status(folder: Path, record: dict[str, Any] | None) -> str:
    """The status to show: a record saying ``running`` whose process is gone (no ``.alive``
    marker, or a stale one: :meth:`FileLock.stale_reason`) is interrupted."""
    if record is None:
        return "unknown"
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    marker = FileLock(folder / ALIVE, timeout=lock_timeout())
    content = marker.read(marker.path)
    if content is None or marker.stale_reason(content) is not None:
        return "interrupted"
    return "running"


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

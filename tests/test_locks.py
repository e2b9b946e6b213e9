"""Create-exclusive lock files with a heartbeat (diffusers_kit.run_folder.FileLock): one holder
at a time across processes, a killed holder's lock taken over with a message, another host's
lock waited for while its heartbeat is fresh and taken over once it is old, and of several
takers racing for one stale lock exactly one wins."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from diffusers_kit.run_folder import (
    ALIVE,
    FileLock,
    alive_marker,
    build_lock,
    live_status,
    lock_timeout,
)
from diffusers_kit.spec.errors import SpecError

fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                          reason="the process tests fork")


def _take_turns(path: str, log: str, rounds: int) -> None:
    for _ in range(rounds):
        with FileLock(Path(path), poll=0.002, heartbeat=0.05, timeout=30):
            with open(log, "a") as handle:
                handle.write(f"enter {os.getpid()}\n")
                handle.flush()
            time.sleep(0.005)
            with open(log, "a") as handle:
                handle.write(f"exit {os.getpid()}\n")


@fork
def test_two_processes_hold_the_lock_one_at_a_time(tmp_path: Path) -> None:
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_take_turns, args=(str(lock), str(log), 15))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 3 * 15
    # never two holders: every enter is followed by the same process's exit
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.split()[0] == "enter" and leave == f"exit {enter.split()[1]}"
    assert len({line.split()[1] for line in lines}) == 3
    assert not lock.exists()  # released after the last holder
    assert not list(tmp_path.glob("x.lock*"))


def _hold_forever(path: str, ready) -> None:  # type: ignore[no-untyped-def]
    FileLock(Path(path), heartbeat=0.05, timeout=30).acquire()
    ready.set()
    time.sleep(60)


@fork
def test_a_killed_holder_is_taken_over_with_a_message(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_forever, args=(str(lock), ready))
    holder.start()
    assert ready.wait(30)
    content = json.loads(lock.read_text())
    assert content["pid"] == holder.pid and content["host"] == socket.gethostname()
    assert set(content) >= {"host", "pid", "started", "heartbeat", "token"}
    waiter = FileLock(lock, timeout=30)
    assert not waiter.acquire(wait=0.05)  # alive, with a fresh heartbeat: not taken
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    said: list[str] = []
    taker = FileLock(lock, timeout=30, say=said.append, poll=0.01)
    assert taker.acquire(wait=5)  # the timeout is 30 s: the dead pid decided
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "process is gone" in said[0]
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()
    assert not lock.exists()


def _foreign(lock: Path, age: float) -> dict:
    """A lock file as a dkit on another machine would leave it, its heartbeat ``age`` s old."""
    beat = time.time() - age
    content = {"host": "elsewhere.cluster", "pid": os.getpid(), "started": beat - 100,
               "heartbeat": beat, "token": "f" * 32}
    lock.write_text(json.dumps(content))
    return content


def test_another_hosts_lock_is_waited_for_while_it_beats(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    _foreign(lock, age=0.0)  # the pid is ours, but on another host a pid says nothing
    said: list[str] = []
    waiter = FileLock(lock, timeout=0.6, poll=0.01, say=said.append, what="the model")
    beating = threading.Event()

    def beat() -> None:  # the other host's heartbeat, for a while, then it releases
        for _ in range(6):
            _foreign(lock, age=0.0)
            time.sleep(0.05)
        lock.unlink()
        beating.set()

    thread = threading.Thread(target=beat)
    thread.start()
    assert waiter.acquire(wait=10)
    thread.join()
    assert beating.is_set()  # held only after the other host let go, never taken over
    assert len(said) == 1 and said[0].startswith("waiting for the model, held by "
                                                  "elsewhere.cluster pid")
    waiter.release()


def test_another_hosts_old_heartbeat_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    _foreign(lock, age=120.0)
    said: list[str] = []
    assert FileLock(lock, timeout=60, say=said.append, what="the model").acquire(wait=0)
    assert len(said) == 1
    assert "elsewhere.cluster" in said[0] and "no heartbeat for 120 s (more than 60 s)" in said[0]
    # a fresh one with the same timeout is not
    other = tmp_path / "y.lock"
    _foreign(other, age=10.0)
    assert not FileLock(other, timeout=60).acquire(wait=0)


def test_a_held_lock_keeps_beating(tmp_path: Path) -> None:
    """A holder that keeps the lock longer than the timeout is not taken over: the heartbeat
    thread keeps it fresh."""
    lock = tmp_path / "x.lock"
    holder = FileLock(lock, timeout=0.3, heartbeat=0.03)
    assert holder.acquire(wait=0)
    first = json.loads(lock.read_text())["heartbeat"]
    waiter = FileLock(lock, timeout=0.3, poll=0.02)
    assert not waiter.acquire(wait=0.7)  # more than twice the timeout
    assert json.loads(lock.read_text())["heartbeat"] > first
    holder.release()
    assert waiter.acquire(wait=1)
    waiter.release()


def _take(lock: FileLock, won: list[FileLock]) -> None:
    if lock.acquire(wait=0):
        won.append(lock)


def test_takers_racing_for_a_stale_lock_only_one_wins(tmp_path: Path) -> None:
    """Every taker has judged the lock stale before any takes it over (a barrier in between):
    the worst interleaving, forced."""

    class Racing(FileLock):
        def _take_over(self, content: dict, reason: str) -> bool:
            judged.wait()
            return super()._take_over(content, reason)

    for round_ in range(5):
        lock = tmp_path / f"{round_}.lock"
        _foreign(lock, age=120.0)
        said: list[str] = []
        locks = [Racing(lock, timeout=60, say=said.append) for _ in range(6)]
        judged = threading.Barrier(len(locks))
        won: list[FileLock] = []

        threads = [threading.Thread(target=_take, args=(one, won)) for one in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1 and len(said) == 1
        assert json.loads(lock.read_text())["token"] == won[0].token
        won[0].release()
        assert not lock.exists() and not Path(f"{lock}.takeover").exists()


def test_released_on_exceptions_and_build_lock_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), build_lock(tmp_path, "ab" * 32):
        assert (tmp_path / ".locks" / f"{'ab' * 16}.lock").is_file()
        raise RuntimeError("boom")
    assert not any((tmp_path / ".locks").iterdir())
    with build_lock(tmp_path, "ab" * 32):
        pass
    assert not any((tmp_path / ".locks").iterdir())


def test_build_lock_says_whose_lock_it_took_over(tmp_path: Path) -> None:
    from io import StringIO

    from rich.console import Console

    digest = "cd" * 32
    (tmp_path / ".locks").mkdir()
    _foreign(tmp_path / ".locks" / f"{digest[:32]}.lock", age=600.0)
    out = StringIO()
    with build_lock(tmp_path, digest, Console(file=out, width=200), "dm"):
        held = json.loads((tmp_path / ".locks" / f"{digest[:32]}.lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    text = " ".join(out.getvalue().split())
    assert "took over the lock of another dkit building dm from elsewhere.cluster pid" in text
    assert "no heartbeat for 600 s (more than 60 s)" in text
    assert not any((tmp_path / ".locks").iterdir())


def test_live_status_reads_the_alive_marker(tmp_path: Path) -> None:
    running = {"status": "running"}
    assert live_status(tmp_path, running) == "interrupted"  # no marker
    with alive_marker(tmp_path):
        assert live_status(tmp_path, running) == "running"
        assert live_status(tmp_path, {"status": "finished"}) == "finished"
    assert not (tmp_path / ALIVE).exists()
    _foreign(tmp_path / ALIVE, age=1.0)  # a run on another machine, beating
    assert live_status(tmp_path, running) == "running"
    _foreign(tmp_path / ALIVE, age=3600.0)  # one that died there an hour ago
    assert live_status(tmp_path, running) == "interrupted"
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "started": time.time(),
            "heartbeat": time.time(), "token": "0" * 32}  # above any pid Linux hands out
    (tmp_path / ALIVE).write_text(json.dumps(dead))
    assert live_status(tmp_path, running) == "interrupted"


def test_the_timeout_comes_from_the_environment() -> None:
    assert lock_timeout({}) == 60.0
    assert lock_timeout({"DKIT_LOCK_TIMEOUT": "300"}) == 300.0
    for bad in ("soon", "0", "-5", "nan"):
        with pytest.raises(SpecError, match="DKIT_LOCK_TIMEOUT"):
            lock_timeout({"DKIT_LOCK_TIMEOUT": bad})

"""The CPU thread policy of the ``dkit`` command line.

torch's default is one intra-op thread per core, each spinning while it waits for work. When
another CPU-heavy process shares the machine the threads outnumber the free cores and spend
their time waiting on each other: on a 2-core machine a training run beside one competing
process slowed ~25x (docs/solvers_benchmark.md, "threads"). The policy: use the cores that are
free, judged when the command starts from the usable cores (the CPU affinity mask) minus the
cores other processes keep busy now (a 0.1 s sample of the machine's CPU time, not the 1-minute
load average, which still counts work that has just ended), never fewer than one; an explicit
``--threads N`` or ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """``(busy, total)`` CPU time of the whole machine since boot, in clock ticks, from the
    first line of ``/proc/stat`` (idle and iowait are not busy); None where there is none."""
    try:
        with open(stat, encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    try:
        ticks = [int(value) for value in fields[1:]]
    except ValueError:
        return None
    total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return total - idle, total


SAMPLE_SECONDS = 0.1  # long enough for ~10 clock ticks per core at the usual 100 Hz


def busy_cores(sample: float = SAMPLE_SECONDS,
               read: Callable[[], tuple[int, int] | None] = cpu_times,
               sleep: Callable[[float], None] = time.sleep,
               online: int | None = None) -> float:
    """Cores other processes keep busy now: the busy share of the machine's CPU time over a
    short ``sample`` (two readings of ``/proc/stat``) times its online cores. What is busy now
    decides, not what was: the 1-minute load average, used only where there is no
    ``/proc/stat``, still counts a ``pip install`` that just finished. 0 where unknown."""
    first = read()
    if first is not None:
        sleep(sample)
        second = read()
        if second is not None and second[1] > first[1]:
            share = (second[0] - first[0]) / (second[1] - first[1])
            cores = online if online is not None else (os.cpu_count() or 1)
            return max(0.0, min(1.0, share)) * cores
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: str | int | None = "auto", *,
                   environ: Mapping[str, str] | None = None,
                   cores: int | None = None, load: float | None = None) -> int:
    """Intra-op threads for this run: ``requested`` when it is a number, else
    ``OMP_NUM_THREADS`` when set, else the free cores ``max(1, cores - round(load))``."""
    if requested not in (None, "auto"):
        value = int(requested)  # type: ignore[arg-type]
        if value < 1:
            raise ValueError(f"--threads must be at least 1 (or 'auto'); given {requested}")
        return value
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"])
    cores = usable_cores() if cores is None else cores
    load = busy_cores() if load is None else load
    return max(1, min(cores, cores - round(load)))


def apply_thread_policy(requested: str | int | None = "auto") -> int:
    """Set torch's intra-op threads by :func:`choose_threads` and one inter-op thread (the
    samplers and the trainer issue one op at a time); returns the thread count."""
    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # fixed once parallel work has started: keep it
        torch.set_num_interop_threads(1)
    return threads

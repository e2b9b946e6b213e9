"""The CPU thread policy of the ``dkit`` command line.

torch's default is one intra-op thread per core, each spinning while it waits for work. When
another CPU-heavy process shares the machine the threads outnumber the free cores and spend
their time waiting on each other: on a 2-core machine a training run beside one competing
process slowed ~25x (docs/solvers_benchmark.md, "threads"). The policy: use the cores that are
free, judged when the command starts from the usable cores (the CPU affinity mask) minus the
load other processes put on them (the 1-minute load average), never fewer than one; an explicit
``--threads N`` or ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """Cores other processes keep busy now: the 1-minute load average (0 where unknown)."""
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

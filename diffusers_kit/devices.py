"""Which devices this machine has: the one check behind ``device:`` in a spec and the Python API.

A device string that names hardware this build of torch or this machine lacks (``mps`` without
MPS, ``cuda:7`` on a one-GPU machine) is a spec error found by ``dkit validate``, not a crash
half-way through a run.
"""

from __future__ import annotations

import torch


def device_problem(device: str) -> str | None:
    """What is wrong with ``device`` on this machine (None when it can be used)."""
    text = str(device).strip()
    if text in ("auto", "cpu"):
        return None
    if text == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            return "a device this machine has (this torch has no MPS support here; use auto or cpu)"
        return None
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or len(index) > 4:
        return "auto, cpu, cuda, cuda:<index> or mps"
    if not torch.cuda.is_available():
        return "a device this machine has (no CUDA here; use auto or cpu)"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"a CUDA device index below {count} (this machine has {count} GPU(s))"
    return None


def device_available(device: str) -> str:
    """Pydantic validator: ``device`` unchanged when this machine has it, else ValueError."""
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(problem)
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a ``MemoryError``, CUDA's ``OutOfMemoryError`` or
    the ``RuntimeError`` torch's CPU allocator raises (``can't allocate memory``)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)

"""Checkpoints in safetensors (no pickle), written atomically: temporary file, fsync, rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous, on the CPU) with JSON-encoded metadata, atomically.

    Tensors that share storage (a buffer in both the weights and the EMA state) are copied:
    safetensors stores every tensor on its own."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        flat[key] = value.clone() if where in seen else value
        seen.add(where)
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(Path(path), lambda tmp: save_file(flat, tmp, metadata=meta))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    return tensors, {k: json.loads(v) for k, v in raw.items()}


def load_metadata(path: Path) -> dict[str, Any]:
    """Only the metadata of a checkpoint (no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items()}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

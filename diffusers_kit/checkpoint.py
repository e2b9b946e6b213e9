"""Checkpoints in safetensors (no pickle), written atomically: temporary file, fsync, rename.

Every checkpoint carries a SHA-256 checksum of its tensors and metadata, verified on load; a
file that is missing, empty, truncated, corrupt or damaged raises :class:`CheckpointError`
naming the file and the problem. A checkpoint without a checksum (an edit that removed it, or a
file older than dkit 0.2, the first to write one into every checkpoint) is refused too, unless
unverified files are trusted explicitly: ``dkit --trust-unverified``, the environment variable
``DKIT_TRUST_UNVERIFIED=1`` or ``load_checkpoint(path, trust_unverified=True)``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _new_temporary(path: Path) -> str:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path`` with the permissions of any new
    file (0666 less the umask, like the run's other files; mkstemp's 0600, and safetensors'
    own, left checkpoints, run.json and metrics.json unreadable to the group and others, so a
    run shared read-only could not be sampled). ``O_EXCL`` never follows or reuses an existing
    name or link."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors: 0600) keeps it too
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
    meta[CHECKSUM_KEY] = checksum(flat, meta)
    atomic_write_bytes(Path(path), lambda tmp: _save_file(flat, tmp, meta))


def _save_file(flat: dict[str, torch.Tensor], tmp: str, meta: dict[str, str]) -> None:
    """``safetensors``' writer, whose I/O failures (disk full, read-only) arrive as a
    ``SafetensorError`` naming ``os error N``: turned back into the ``OSError`` they are, so the
    CLI reports them as the environment's (exit 3) with the file and the hint."""
    try:
        save_file(flat, tmp, metadata=meta)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), tmp) from exc


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, foreign or incomplete.

    The message names the file and what is wrong with it; ``dkit`` exits with status 4."""

    exit_code = 4

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


CHECKSUM_KEY = "dkit_checksum"
_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
           "U64", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry, in name
    order: a flipped bit anywhere in the file's content changes it."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            digest.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        value = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def read_header(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata strings, tensor index) of a safetensors file, with a clear error for a file
    that is missing, empty, truncated or not safetensors at all."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            if size == 0:
                raise CheckpointError(path, "the file is empty (zero bytes): a write that never "
                                      "finished, or not a checkpoint")
            if len(head) < 8:
                raise CheckpointError(path, f"the file is truncated ({size} bytes, shorter than "
                                      "a safetensors header)")
            length = struct.unpack("<Q", head)[0]
            if length > min(_MAX_HEADER, size - 8):
                raise CheckpointError(path, f"not a safetensors file, or truncated: its header "
                                      f"claims {length} bytes, the file has {size}")
            raw = handle.read(length)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(path, "not readable (permission denied)") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, "its header is not valid JSON: the file is corrupt or not "
                              "a safetensors checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "its header is not a JSON object: the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "its metadata is not a mapping of strings: corrupt")
    data_size = size - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES
                or not isinstance(entry.get("shape"), list) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(path, f"tensor {name!r} has a malformed entry in the header: "
                                  "the file is corrupt")
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise CheckpointError(path, f"tensor {name!r} lies beyond the end of the file "
                                  f"({offsets[1]} > {data_size} data bytes): truncated")
    return metadata, header


def _decode_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key == CHECKSUM_KEY:
            continue
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            raise CheckpointError(path, f"metadata entry {key!r} is not valid JSON: "
                                  "corrupt") from None
    return decoded


def trusting_unverified() -> bool:
    """Whether checkpoints without a checksum load: ``dkit --trust-unverified`` (which sets
    ``DKIT_TRUST_UNVERIFIED=1`` for the command) or that variable set by the user."""
    return os.environ.get("DKIT_TRUST_UNVERIFIED", "") not in ("", "0")


def load_checkpoint(path: Path, trust_unverified: bool | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata written by :func:`save_checkpoint`, verifying the checksum.

    Raises :class:`CheckpointError` (naming the file) for anything but a whole, intact file,
    and for a file without a checksum (``dkit_checksum``) unless ``trust_unverified`` (None:
    :func:`trusting_unverified`): every checkpoint dkit 0.2 and later writes has one, so its
    absence means an older file or one whose checksum was removed with an edit."""
    path = Path(path)
    raw, _ = read_header(path)
    trust = trusting_unverified() if trust_unverified is None else trust_unverified
    if CHECKSUM_KEY not in raw and not trust:
        raise CheckpointError(path, f"it has no checksum ({CHECKSUM_KEY}), so its contents "
                              "cannot be verified: every checkpoint dkit 0.2 and later writes "
                              "has one. For an older file you trust, add --trust-unverified "
                              "(dkit --trust-unverified COMMAND ...)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"safetensors cannot read it ({first})") from None
    expected = raw.get(CHECKSUM_KEY)
    if expected is not None and checksum(tensors, raw) != expected:
        raise CheckpointError(path, "its checksum does not match its contents: the file was "
                              "damaged after it was written (disk, copy or edit)")
    return tensors, _decode_metadata(path, raw)


def load_metadata(path: Path) -> dict[str, Any]:
    """Only the metadata of a checkpoint (the header is checked; the tensors are not read)."""
    path = Path(path)
    raw, _ = read_header(path)
    return _decode_metadata(path, raw)


def remove_orphans(folder: Path, name: str = "checkpoint.safetensors") -> list[Path]:
    """Delete temporary files a killed :func:`atomic_write_bytes` left beside ``name``.

    Only files matching its own pattern ``.<name>.*.tmp`` are touched; returns what was removed."""
    removed = []
    for candidate in Path(folder).glob(f".{name}.*.tmp"):
        try:
            if candidate.is_file() and not candidate.is_symlink():
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue  # another process's, or not ours to delete: leave it
    return removed


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

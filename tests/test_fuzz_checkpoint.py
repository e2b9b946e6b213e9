"""Fuzz (issue 14): damaged checkpoint bytes give a CheckpointError naming the file, or — when
the damage changed nothing that matters (header padding) — exactly the original contents; never
another exception, never silently different tensors."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_kit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TENSORS = {"network.w": torch.linspace(-1, 1, 24).reshape(4, 6),
           "network.b": torch.arange(4, dtype=torch.int64),
           "ema.w": torch.full((2, 3), 0.5, dtype=torch.bfloat16)}
METADATA = {"step": 12, "training": {"train_step": 12, "log": {"steps": [4], "losses": [0.5]}}}


def original() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.safetensors"
        save_checkpoint(path, TENSORS, METADATA)
        return path.read_bytes()


ORIGINAL = original()
HEADER = 8 + struct.unpack("<Q", ORIGINAL[:8])[0]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(ORIGINAL)
    sort = draw(st.sampled_from(["flip", "truncate", "insert", "length", "splice"]))
    if sort == "flip":
        for _ in range(draw(st.integers(1, 4))):
            # half the flips land in the header, where structure breaks in many ways
            limit = HEADER if draw(st.booleans()) else len(data)
            data[draw(st.integers(0, limit - 1))] ^= 1 << draw(st.integers(0, 7))
    elif sort == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif sort == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif sort == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:  # replace a run of bytes by something of the same length
        at = draw(st.integers(0, len(data) - 1))
        size = min(draw(st.integers(1, 32)), len(data) - at)
        data[at:at + size] = draw(st.binary(min_size=size, max_size=size))
    return bytes(data)


@settings(max_examples=60, deadline=None)
@given(damaged())
def test_damaged_bytes_are_refused_or_load_unchanged(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.safetensors"
        path.write_bytes(data)
        try:
            tensors, metadata = load_checkpoint(path)
        except CheckpointError as exc:
            assert exc.path == str(path) and exc.problem
            return
    assert metadata == METADATA
    assert tensors.keys() == TENSORS.keys()
    for key, value in TENSORS.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key

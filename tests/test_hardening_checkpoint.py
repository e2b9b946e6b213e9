"""Checkpoint integrity (issue 14): every corrupt, truncated, foreign or incomplete checkpoint is
a clear error naming the file, exit status 4 from --resume, --from and `dkit sample`, never a
traceback; the checksum catches flipped data bytes; orphan temporary files are removed; a
diverged run resumes with --allow-change."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from diffusers_kit.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    load_checkpoint,
    load_metadata,
    remove_orphans,
    save_checkpoint,
)
from tests.helpers import MOONS_SPEC, copy_run, finished_run, run_cli, run_dirs

CKPT = "checkpoint.safetensors"


def tensors() -> dict[str, torch.Tensor]:
    return {"network.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "network.b": torch.ones(3, dtype=torch.bfloat16), "train.flag": torch.tensor(True),
            "train.step": torch.tensor(7)}


def test_a_checkpoint_round_trips_with_its_checksum(tmp_path):
    path = tmp_path / CKPT
    save_checkpoint(path, tensors(), {"step": 7, "training": {"train_step": 7}})
    loaded, meta = load_checkpoint(path)
    assert meta == {"step": 7, "training": {"train_step": 7}}  # the checksum is not metadata
    for key, value in tensors().items():
        assert torch.equal(loaded[key], value)
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    assert header["__metadata__"][CHECKSUM_KEY].startswith("sha256:")


def corruptions(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    flipped_data = bytearray(data)
    flipped_data[-3] ^= 0x10  # a bit of the last tensor's bytes
    flipped_header = bytearray(data)
    flipped_header[8] ^= 0xFF  # the header's opening brace
    edited = data[: 8 + length].replace(b'"step":"7"', b'"step":"9"')  # still valid JSON
    assert edited != data[: 8 + length]
    return {
        "zero-length": b"",
        "shorter than a header": data[:5],
        "truncated": data[: len(data) - 20],
        "header cut": data[: 8 + length // 2],
        "flipped header": bytes(flipped_header),
        "flipped data": bytes(flipped_data),
        "edited metadata": edited + data[8 + length:],
        "huge header length": struct.pack("<Q", 1 << 60) + data[8:],
        "not safetensors": b"PK\x03\x04" + b"\x00" * 100,
    }


@pytest.mark.parametrize("case", ["zero-length", "shorter than a header", "truncated",
                                  "header cut", "flipped header", "flipped data",
                                  "edited metadata", "huge header length", "not safetensors"])
def test_every_corruption_is_a_checkpoint_error_naming_the_file(tmp_path, case):
    path = tmp_path / CKPT
    save_checkpoint(path, tensors(), {"step": 7})
    path.write_bytes(corruptions(path)[case])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert caught.value.path == str(path) and str(path) in str(caught.value)
    assert caught.value.problem


def test_a_missing_file_or_a_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_metadata(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_without_a_checksum_loads_only_when_trusted(tmp_path, monkeypatch):
    """Written before checksums (or by plain safetensors, or with the checksum edited out):
    refused (issue 29), loaded when unverified files are trusted explicitly."""
    monkeypatch.delenv("DKIT_TRUST_UNVERIFIED", raising=False)
    path = tmp_path / CKPT
    save_file({"network.w": torch.zeros(2)}, str(path), metadata={"step": "3"})
    with pytest.raises(CheckpointError, match=r"no checksum.*--trust-unverified"):
        load_checkpoint(path)
    loaded, meta = load_checkpoint(path, trust_unverified=True)
    assert meta == {"step": 3} and torch.equal(loaded["network.w"], torch.zeros(2))


def test_orphan_temporary_files_are_removed_and_nothing_else(tmp_path):
    (tmp_path / f".{CKPT}.abc123.tmp").write_bytes(b"half")
    (tmp_path / f".{CKPT}.zz.tmp").write_bytes(b"")
    keep = [tmp_path / CKPT, tmp_path / "notes.tmp", tmp_path / f".{CKPT}.tmp.keep"]
    for path in keep:
        path.write_bytes(b"x")
    removed = remove_orphans(tmp_path, CKPT)
    assert sorted(p.name for p in removed) == [f".{CKPT}.abc123.tmp", f".{CKPT}.zz.tmp"]
    assert all(p.exists() for p in keep)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_have_the_permissions_of_any_new_file(tmp_path, umask):
    # mkstemp made checkpoints, run.json and metrics.json 0600 whatever the umask: a run shared
    # read-only (another user's, or a copy of it) failed with exit 4 'not readable'
    import os
    import stat

    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / CKPT, tensors())
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {CKPT: 0o666 & ~umask, "plain.txt": 0o666 & ~umask}, "no temporary left"

# -- through the CLI ---------------------------------------------------------------------------
MOONS = MOONS_SPEC


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run, trained once for the whole module."""
    return finished_run(tmp_path_factory.mktemp("finished"), MOONS)


def damage(path: Path, case: str) -> None:
    path.write_bytes(corruptions_of_file(path)[case])


def corruptions_of_file(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2 + len(data) // 4] ^= 0x01
    header = bytearray(data)
    header[8] ^= 0xFF
    return {"zero-length": b"", "truncated": data[: len(data) // 2],
            "flipped header": bytes(header), "flipped data": bytes(flipped)}


@pytest.mark.parametrize("case", ["zero-length", "truncated", "flipped header", "flipped data"])
@pytest.mark.parametrize("how", ["--resume", "--from", "sample"])
def test_a_damaged_checkpoint_exits_4_naming_the_file(finished, tmp_path, capsys, case, how):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    checkpoint = run_dir / CKPT
    damage(checkpoint, case)
    if how == "sample":
        args = ["sample", str(run_dir), "--n", "4"]
    elif how == "--from":
        args = ["run", str(spec), "--only", "sample", "--from", str(run_dir), "--quiet"]
    else:
        args = ["run", str(spec), "--resume", str(run_dir), "train.steps=12", "--quiet"]
    code, out, err = run_cli(args, capsys)
    flat = " ".join(err.split())
    assert code == 4, flat
    assert "Traceback" not in out + err
    assert f"checkpoint {checkpoint} cannot be used" in flat
    assert len(run_dirs(tmp_path)) == 1, "a refused run creates no new folder"
    if how == "sample":
        assert not (run_dir / "sampling").exists()


def test_a_checkpoint_without_training_state_keys_is_refused_on_resume(finished, tmp_path,
                                                                        capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    loaded, meta = load_checkpoint(run_dir / CKPT)
    del meta["training"]["optimizer"]
    loaded.pop("train.rng.data")
    save_checkpoint(run_dir / CKPT, loaded, meta)
    code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=12",
                              "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 4 and "optimizer, rng.data" in flat and "Traceback" not in out + err


def test_resume_removes_an_orphan_temporary_file(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    orphan = run_dir / f".{CKPT}.k1ll3d.tmp"
    orphan.write_bytes(b"a write that a kill -9 interrupted")
    code, _, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                            "--quiet"], capsys)
    assert code == 0, err
    assert not orphan.exists()
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]  # a finished run is not changed
    assert load_metadata(new / CKPT)["training"]["train_step"] == 10


def test_resume_after_divergence_with_a_smaller_learning_rate(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    code, _, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                            "train.optimizer.lr=0.0001", "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "train.optimizer.lr" in flat
    assert "--allow-change train.optimizer.lr" in flat, "the way out is named"
    code, _, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                            "train.optimizer.lr=0.0001", "--allow-change", "train.optimizer.lr",
                            "--quiet"], capsys)
    assert code == 0, err
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]  # a finished run is not changed
    _, meta = load_checkpoint(new / CKPT)
    groups = json.loads(meta["training"]["optimizer"])["param_groups"]
    assert meta["training"]["train_step"] == 10
    assert [g["lr"] for g in groups] == [0.0001], "the new learning rate is used, not the old"


def test_allow_change_still_refuses_a_network_that_cannot_load(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "train.steps=10",
                              "network.width=8", "--allow-change", "network", "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "weights fit this spec's network" in flat and "network.width" in flat
    assert "Traceback" not in out + err
    assert load_metadata(run_dir / CKPT)["training"]["train_step"] == 8, "nothing was touched"


def test_from_with_training_warm_starts_and_names_the_differences(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    code, _, err = run_cli(["run", str(spec), "--from", str(run_dir), "train.steps=2",
                            "train.optimizer.lr=0.0005", "--quiet"], capsys)
    assert code == 0, err
    flat = " ".join(err.split())
    assert "differs in train.optimizer.lr" in flat
    (new,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    assert load_metadata(new / CKPT)["step"] == 8 + 2, "training continued from the weights"


def test_a_foreign_spec_yaml_in_the_run_folder_is_reported(finished, tmp_path, capsys):
    spec, run_dir = copy_run(finished[1], tmp_path, MOONS)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(["not", "a", "spec"]))
    code, out, err = run_cli(["run", str(spec), "--resume", str(run_dir), "--quiet"], capsys)
    assert code == 4 and "spec.yaml" in err and "Traceback" not in out + err

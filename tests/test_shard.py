"""Sharded sampling: ``dkit sample --shard K/N`` + ``dkit merge`` equal one ``dkit sample``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusers_kit.cli.merge import shard_batch, shard_range
from diffusers_kit.diffusion import default_batch_size
from diffusers_kit.pipeline import run_folders
from tests.helpers import run_cli, write_spec

SOLVER = "{kind: annealed_langevin, steps_per_level: 2, epsilon: 5.0e-5}"  # noise every step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run for every test here."""
    tmp_path = tmp_path_factory.mktemp("shard")
    from diffusers_kit.cli.main import main

    assert main(["run", str(write_spec(tmp_path)), "--quiet", "--only", "train"]) == 0
    (run,) = run_folders(tmp_path / "runs", "tiny")
    return run


def draw_shards(run: Path, count: int, capsys, n: int = 10, seed: int = 5) -> Path:
    for k in range(count):
        code, _, err = run_cli(["sample", str(run), "--solver", SOLVER, "--n", str(n), "--seed",
                                str(seed), "--shard", f"{k}/{count}"], capsys)
        assert code == 0, err
    (parent,) = [p for p in (run / "sampling").iterdir()
                 if p.name.startswith("shards-") and len(list(p.iterdir())) == count
                 and json.loads((next(p.iterdir()) / "shard.json").read_text())["seed"] == seed]
    return parent


def test_shards_are_whole_batches_covering_every_index_once():
    for n in (1, 7, 10, 64):
        for count in range(1, n + 1):
            batch = shard_batch(n, count, None, (1, 8, 8))
            spans = [shard_range(k, count, n, batch) for k in range(count)]
            assert [i for span in spans for i in range(*span)] == list(range(n))
            assert all(stop > start for start, stop in spans), "no shard is empty"
            assert all(start % batch == 0 for start, _ in spans), "shards start on a batch"
    assert shard_batch(100_000, 4, None, (1, 8, 8)) == default_batch_size(100_000, (1, 8, 8))
    assert shard_batch(10, 3, 5, (1, 8, 8)) == 5


def test_merged_shards_equal_one_unsharded_sample_bit_for_bit(trained, tmp_path, capsys):
    parent = draw_shards(trained, 3, capsys)
    manifests = [json.loads((parent / f"shard-{k}-of-3" / "shard.json").read_text())
                 for k in range(3)]
    assert [m["indices"] for m in manifests] == [[0, 3], [3, 6], [6, 10]]  # batches of 3
    assert {m["batch_size"] for m in manifests} == {3}
    code, _, err = run_cli(["merge", str(parent), "-o", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["sample", str(trained), "sample.batch_size=3", "--solver", SOLVER,
                              "--n", "10", "--seed", "5"], capsys)
    assert code == 0, err
    (whole,) = [p for p in (trained / "sampling").iterdir()
                if not p.name.startswith("shards-")]
    with np.load(whole / "samples.npz") as a, np.load(tmp_path / "merged" / "samples.npz") as b:
        assert a["samples"].shape == (10, 1, 8, 8)
        assert a["samples"].tobytes() == b["samples"].tobytes()
        assert a["display"].tobytes() == b["display"].tobytes()
    assert (tmp_path / "merged" / "samples.png").is_file()
    # the shards are the rows of the whole draw, not merely a permutation of them
    with np.load(parent / "shard-1-of-3" / "samples.npz") as shard, \
            np.load(whole / "samples.npz") as a:
        assert shard["samples"].tobytes() == a["samples"][3:6].tobytes()


def test_merge_names_missing_duplicated_and_foreign_shards(trained, tmp_path, capsys):
    parent = draw_shards(trained, 4, capsys, n=8, seed=11)
    shards = [str(parent / f"shard-{k}-of-4") for k in range(4)]
    code, _, err = run_cli(["merge", shards[0], shards[2], "-o", str(tmp_path / "a")], capsys)
    assert code == 2
    text = " ".join(err.split())
    assert "missing shard 1/4 (samples 2..3), shard 3/4 (samples 6..7)" in text
    assert not (tmp_path / "a").exists()
    copy = tmp_path / "copy"
    shutil.copytree(shards[1], copy)
    code, _, err = run_cli(["merge", *shards, str(copy), "-o", str(tmp_path / "b")], capsys)
    assert code == 2 and "shard 1/4 given 2 times" in " ".join(err.split())
    other = draw_shards(trained, 4, capsys, n=8, seed=12)
    code, _, err = run_cli(["merge", *shards[:3], str(other / "shard-3-of-4"), "-o",
                            str(tmp_path / "c")], capsys)
    assert code == 2 and "the same seed" in " ".join(err.split())
    with np.load(Path(shards[3]) / "samples.npz") as npz:
        changed = {name: npz[name] for name in npz.files}
    changed["samples"] = changed["samples"] + 1
    np.savez_compressed(copy / "samples.npz", **changed)
    code, _, err = run_cli(["merge", *shards[:3], str(copy), "-o", str(tmp_path / "d")], capsys)
    assert code == 2 and "changed since" in " ".join(err.split())


def test_bad_shard_options_are_exit_2(trained, capsys):
    for shard in ("3/3", "1", "a/b", "-1/2"):
        code, _, err = run_cli(["sample", str(trained), "--shard", shard], capsys)
        assert code == 2 and "--shard" in err, shard
    code, _, err = run_cli(["sample", str(trained), "--n", "2", "--shard", "0/3"], capsys)
    assert code == 2 and "at most n = 2 shards" in " ".join(err.split())
    code, _, err = run_cli(["sample", str(trained), "--shard", "0/2", "--progressive"], capsys)
    assert code == 2 and "--progressive" in err


def test_torchrun_environment_shards_by_rank(trained, capsys):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "diffusers_kit.cli.main", "sample",
                           str(trained), "--solver", SOLVER, "--n", "6", "--seed", "21"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (folder,) = [p for p in (trained / "sampling").glob("shards-*/shard-1-of-2")
                 if json.loads((p / "shard.json").read_text())["seed"] == 21]
    manifest = json.loads((folder / "shard.json").read_text())
    assert manifest["indices"] == [3, 6] and manifest["shards"] == 2


def test_a_failed_shard_removes_only_its_own_folder_and_a_drawn_one_is_refused(
        trained, capsys, monkeypatch):
    parent = draw_shards(trained, 2, capsys, n=4, seed=31)
    shutil.rmtree(parent / "shard-1-of-2")
    from diffusers_kit.cli import sample

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sample, "draw_samples", broken)
    argv = ["sample", str(trained), "--solver", SOLVER, "--n", "4", "--seed", "31"]
    assert run_cli([*argv, "--shard", "1/2"], capsys)[0] != 0
    assert not (parent / "shard-1-of-2").exists()
    assert (parent / "shard-0-of-2" / "shard.json").is_file(), "the neighbour is kept"
    monkeypatch.undo()
    code, _, err = run_cli([*argv, "--shard", "0/2"], capsys)
    assert code == 2 and "remove" in err and "shard-0-of-2" in " ".join(err.split())


# -- dkit restore --shard ----------------------------------------------------------------------
RESTORE = ["--operator", "{kind: inpaint, mask: center, box_size: 0.5, sigma_y: 0.05}",
           "--method", "replacement", "--n", "5", "--samples-per-image", "2", "--solver",
           SOLVER, "--seed", "4", "--quiet"]


def restoration_shards(run: Path, count: int, capsys, extra: tuple[str, ...] = ()) -> Path:
    for k in range(count):
        code, _, err = run_cli(["restore", str(run), *RESTORE, *extra, "--shard",
                                f"{k}/{count}"], capsys)
        assert code == 0, err
    (parent,) = [p for p in (run / "restoration").glob("shards-replacement-inpaint-*")
                 if len(list(p.iterdir())) == count]
    return parent


def test_merged_restoration_shards_equal_one_unsharded_restore_bit_for_bit(
        trained, tmp_path, capsys):
    parent = restoration_shards(trained, 3, capsys, ("restore.batch_size=4",))
    manifests = [json.loads((parent / f"shard-{k}-of-3" / "shard.json").read_text())
                 for k in range(3)]
    # 5 images x 2 restorations in batches of 4 rows: shards of 2, 2 and 1 whole images
    assert [m["indices"] for m in manifests] == [[0, 4], [4, 8], [8, 10]]
    with np.load(parent / "shard-2-of-3" / "restore.npz") as npz:
        assert npz["truth"].shape == (1, 1, 8, 8) and npz["samples"].shape == (2, 1, 8, 8)
    code, _, err = run_cli(["merge", str(parent), "-o", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["restore", str(trained), *RESTORE, "restore.batch_size=4"], capsys)
    assert code == 0, err
    (whole,) = [p for p in (trained / "restoration").iterdir()
                if not p.name.startswith("shards-")]
    merged = tmp_path / "merged"
    with np.load(whole / "restore.npz") as a, np.load(merged / "restore.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        assert a["samples"].shape == (10, 1, 8, 8)
        for name in a.files:
            assert a[name].tobytes() == b[name].tobytes(), name
        with np.load(parent / "shard-1-of-3" / "restore.npz") as shard:
            assert shard["samples"].tobytes() == a["samples"][4:8].tobytes()
            assert shard["measurement"].tobytes() == a["measurement"][2:4].tobytes()
    # judged again over the whole set: the figures of the unsharded restore
    one = json.loads((whole / "restore.json").read_text())
    joined = json.loads((merged / "restore.json").read_text())
    assert set(one) == set(joined) and "psnr" in one and "consistency" in one
    assert {k: v for k, v in one.items() if k != "seconds"} == \
        {k: v for k, v in joined.items() if k != "seconds"}
    assert (merged / "restore.png").is_file()
    # a shard left out is named, in restorations
    code, _, err = run_cli(["merge", str(parent / "shard-0-of-3"), str(parent / "shard-2-of-3"),
                            "-o", str(tmp_path / "partial")], capsys)
    assert code == 2 and "missing shard 1/3 (restorations 4..7)" in " ".join(err.split())
    assert not (tmp_path / "partial").exists()


def test_restore_shards_by_rank_under_torchrun_and_refuses_bad_shards(
        trained, capsys, monkeypatch):
    code, _, err = run_cli(["restore", str(trained), *RESTORE, "--shard", "0/6"], capsys)
    assert code == 2 and "at most 5 shards" in " ".join(err.split())
    code, _, err = run_cli(["restore", str(trained), *RESTORE, "restore.batch_size=3",
                            "--shard", "0/2"], capsys)
    assert code == 2 and "restore.batch_size" in err and "multiple of 2" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(["restore", str(trained), *RESTORE, "--seed", "8"], capsys)
    assert code == 0, err
    (folder,) = [p for p in (trained / "restoration").glob("shards-*/shard-1-of-2")
                 if json.loads((p / "shard.json").read_text())["seed"] == 8]
    manifest = json.loads((folder / "shard.json").read_text())
    assert manifest["kind"] == "restore" and manifest["images"] == 5
    assert manifest["indices"][0] % 2 == 0 and manifest["indices"][1] == 10

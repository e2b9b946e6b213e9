"""``dkit sample RUN --init FILE``: sampling from given start noise ``x_T``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusers_kit.pipeline import run_folders
from tests.helpers import run_cli, write_spec

SOLVER = "{kind: unipc, steps: 5}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("trained")
    from diffusers_kit.cli.main import main

    assert main(["run", str(write_spec(tmp)), "--quiet"]) == 0
    return run_folders(tmp / "runs", "tiny")[0]


def _sample(trained, capsys, *extra):  # type: ignore[no-untyped-def]
    before = set((trained / "sampling").iterdir()) if (trained / "sampling").exists() else set()
    code, _, err = run_cli(["sample", str(trained), "--solver", SOLVER, *extra], capsys)
    assert code == 0, err
    (folder,) = set((trained / "sampling").iterdir()) - before
    with np.load(folder / "samples.npz") as npz:
        samples = npz["samples"]
    return samples, json.loads((folder / "sampling.json").read_text())


def test_the_same_noise_file_gives_the_same_samples(trained, capsys, tmp_path):
    noise = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32) * 8.0
    np.savez(tmp_path / "noise.npz", x_T=noise, other=np.zeros(3))
    one, info = _sample(trained, capsys, "--init", str(tmp_path / "noise.npz"))
    two, _ = _sample(trained, capsys, "--init", str(tmp_path / "noise.npz"))
    assert one.shape == (5, 1, 8, 8) and info["n"] == 5  # n comes from the file
    assert info["init"].endswith("noise.npz")
    np.testing.assert_array_equal(one, two)
    default, info = _sample(trained, capsys, "--n", "5")
    assert "init" not in info
    assert not np.allclose(default, one, atol=1e-3)
    # the same noise as a bare .npy (and --n that agrees with it)
    np.save(tmp_path / "noise.npy", noise)
    again, _ = _sample(trained, capsys, "--init", str(tmp_path / "noise.npy"), "--n", "5")
    np.testing.assert_array_equal(again, one)
    # a different start gives different samples
    np.savez(tmp_path / "other.npz", noise[::-1].copy())
    other, _ = _sample(trained, capsys, "--init", str(tmp_path / "other.npz"))
    # deterministic solver: a per-sample map, up to float rounding: a row's network output can
    # change in its last bits with its place in the batch (with two threads: 2.9e-6 here;
    # docs/noise.md), so reversed rows are equal to rounding, not bit for bit
    np.testing.assert_allclose(other, one[::-1], rtol=0, atol=1e-4)
    assert not np.allclose(other, one, atol=1e-3)


def _bad(tmp_path, kind):  # type: ignore[no-untyped-def]
    noise = np.zeros((4, 1, 8, 8), dtype=np.float32)
    path = tmp_path / f"{kind}.npz"
    if kind == "missing":
        return tmp_path / "nowhere.npz", "no such file"
    if kind == "shape":
        np.savez(path, x_T=np.zeros((4, 64), dtype=np.float32))
        return path, "(4, 1, 8, 8)"
    if kind == "nan":
        noise[1, 0, 2, 3] = np.nan
        np.savez(path, x_T=noise)
        return path, "non-finite"
    if kind == "keys":
        np.savez(path, a=noise, b=noise)
        return path, "x_T"
    if kind == "garbage":
        path.write_text("not an array")
        return path, "--init"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "shape", "nan", "keys", "garbage"])
def test_a_bad_init_file_is_a_clean_exit_2(trained, capsys, tmp_path, kind):
    path, words = _bad(tmp_path, kind)
    before = sorted((trained / "sampling").iterdir()) if (trained / "sampling").exists() else []
    code, out, err = run_cli(["sample", str(trained), "--solver", SOLVER, "--init", str(path)],
                             capsys)
    flat = " ".join((out + err).split())
    assert code == 2, flat
    assert "--init" in flat and words in flat, flat
    assert "Traceback" not in flat
    after = sorted((trained / "sampling").iterdir()) if (trained / "sampling").exists() else []
    assert after == before, "nothing written"


def test_init_and_a_different_n_disagree(trained, capsys, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    code, out, err = run_cli(["sample", str(trained), "--init", str(tmp_path / "noise.npy"),
                              "--n", "6"], capsys)
    assert code == 2 and "--n" in out + err

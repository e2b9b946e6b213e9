"""Colour patches, image folders and array files: shapes, ranges, splits, labels and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_kit.data import ImageFolder, NpzArrays, Patches
from diffusers_kit.data.patches import photograph_path
from tests.helpers import TINY_SPEC, run_cli, write_spec


# -- patches --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patches():
    return Patches(size=16, count=600, seed=3).load()


def test_patches_are_colour_images_in_range(patches):
    assert patches.train.shape == (480, 3, 16, 16) and patches.heldout.shape == (120, 3, 16, 16)
    assert patches.train.dtype == torch.float32
    for split in (patches.train, patches.heldout):
        assert split.min() >= -1 and split.max() <= 1
    assert patches.train.min() < -0.5 and patches.train.max() > 0.5
    # colour, not gray: channels differ
    assert (patches.train[:, 0] - patches.train[:, 2]).abs().mean() > 0.05
    # structure, not flat squares: plenty of patches vary inside
    assert (patches.train.flatten(1).std(1) > 0.05).float().mean() > 0.3
    display = Patches().to_display(patches.train)
    assert display.min() >= 0 and display.max() <= 1


def test_patches_use_both_photographs_and_are_seeded(patches):
    assert set(patches.train_labels.tolist()) == {0, 1}
    assert set(patches.heldout_labels.tolist()) == {0, 1}
    assert abs(int((patches.train_labels == 0).sum()) - 240) <= 1
    again = Patches(size=16, count=600, seed=3).load()
    assert torch.equal(again.train, patches.train) and torch.equal(again.heldout,
                                                                   patches.heldout)
    other = Patches(size=16, count=600, seed=4).load()
    assert not torch.equal(other.train, patches.train)
    only = Patches(size=8, count=50, images=["flower"]).load()
    assert only.train.shape[1:] == (3, 8, 8) and set(only.train_labels.tolist()) == {0}


def test_train_and_heldout_patches_never_overlap():
    data = Patches(size=8, zoom=4, count=3000, seed=5)
    splits = data.load()
    train = {p.numpy().tobytes() for p in splits.train}
    assert not train & {p.numpy().tobytes() for p in splits.heldout}
    # spatially: no training crop shares a pixel with a held-out crop of the same photograph
    crop = data.crop
    for photo in (0, 1):
        covered = np.zeros((427, 640), dtype=bool)
        for _, y, x in data.corners["heldout"][data.corners["heldout"][:, 0] == photo]:
            covered[y:y + crop, x:x + crop] = True
        assert 0 < covered.mean() < 0.5
        inside = np.zeros((428, 641), dtype=np.int64)
        inside[1:, 1:] = covered.cumsum(0).cumsum(1)
        mine = data.corners["train"][data.corners["train"][:, 0] == photo]
        y, x = mine[:, 1], mine[:, 2]
        hits = (inside[y + crop, x + crop] - inside[y, x + crop] - inside[y + crop, x]
                + inside[y, x])
        assert len(mine) > 1000 and (hits == 0).all()
    first = data.corners["train"][0]
    photo = np.asarray(Image.open(photograph_path(["china", "flower"][first[0]])))
    window = photo[first[1]:first[1] + crop, first[2]:first[2] + crop].astype(np.float64)
    expected = window.reshape(8, 4, 8, 4, 3).mean((1, 3)).transpose(2, 0, 1) / 127.5 - 1
    assert np.allclose(splits.train[0].numpy(), expected, atol=1e-5), "area-averaged crop"


def test_patch_sizes_and_loading_is_fast():
    import time

    started = time.perf_counter()
    big = Patches(size=16, count=4000).load()
    assert time.perf_counter() - started < 4.0  # about 0.4 s on one core
    assert big.train.shape[0] + big.heldout.shape[0] == 4000
    assert Patches(size=32, count=10).load().train.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match=r"size \* zoom"):
        Patches(size=32, zoom=8)


# -- image folders --------------------------------------------------------------------------
def _write_images(root, classes=("cats", "dogs"), each=4):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(each):
            pixels = rng.integers(0, 256, size=(20 + 4 * i, 30, 3), dtype=np.uint8)
            pixels[..., 0] = 255 * c  # class 1 is red
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'bmp'}")
    (root / "cats" / "notes.txt").write_text("not an image")


def test_image_folder_with_subfolder_labels(tmp_path):
    _write_images(tmp_path / "set")
    data = ImageFolder(str(tmp_path / "set"), size=16, labels="subfolders",
                       heldout_fraction=0.25)
    splits = data.load()
    assert splits.train.shape == (6, 3, 16, 16) and splits.heldout.shape == (2, 3, 16, 16)
    assert data.classes == ["cats", "dogs"] and data.num_classes == 2
    labels = torch.cat([splits.train_labels, splits.heldout_labels])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4
    images = torch.cat([splits.train, splits.heldout])
    red = images[:, 0].mean((1, 2))
    assert torch.equal(red > 0.9, labels == 1), "labels follow the sub-folders"
    assert images.min() >= -1 and images.max() <= 1
    again = ImageFolder(str(tmp_path / "set"), size=16, labels="subfolders",
                        heldout_fraction=0.25).load()
    assert torch.equal(again.heldout, splits.heldout)


def test_image_folder_grayscale_recursive_and_limit(tmp_path):
    _write_images(tmp_path / "set")
    flat = ImageFolder(str(tmp_path / "set"), size=8)
    with pytest.raises(ValueError, match=r"no images in folder .*set .*sub-folders cats, dogs"):
        flat.load()  # not recursive: only the sub-folders hold images
    data = ImageFolder(str(tmp_path / "set"), size=8, channels=1, recursive=True, limit=5)
    splits = data.load()
    assert splits.train.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.heldout) == 5 and splits.train_labels is None


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(OSError, match=r"nowhere.*does not exist"):
        ImageFolder(str(missing)).load()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no images in folder .*empty.*readme.txt"):
        ImageFolder(str(empty)).load()
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "a.png")
    Image.new("RGB", (8, 8)).save(broken / "b.png")
    (broken / "x.png").write_bytes(b"\x00garbage, not a PNG" * 10)
    with pytest.raises(OSError, match=r"cannot read image .*x.png"):
        ImageFolder(str(broken)).load()


# -- npz / npy ------------------------------------------------------------------------------
def test_npz_uint8_images_round_trip_with_labels(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(20, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    data = NpzArrays(str(tmp_path / "d.npz"), labels_key="y", heldout_fraction=0.25, seed=2)
    splits = data.load()
    assert splits.train.shape == (15, 3, 8, 8) and splits.heldout.shape == (5, 3, 8, 8)
    assert data.modality == "image" and data.num_classes == 4
    both = torch.cat([splits.train, splits.heldout])
    both_labels = torch.cat([splits.train_labels, splits.heldout_labels])
    pixels = torch.round((both + 1) * 127.5).to(torch.uint8).numpy()
    for image, label in zip(pixels, both_labels.tolist(), strict=True):
        index = next(i for i in range(20) if np.array_equal(images[i], image))
        assert labels[index] == label
    assert torch.allclose(data.to_display(both), torch.from_numpy(pixels / 255.0).float(),
                          atol=1e-5)
    # channels last and grayscale (N, H, W) layouts
    np.save(tmp_path / "hwc.npy", images.transpose(0, 2, 3, 1))
    assert NpzArrays(str(tmp_path / "hwc.npy")).load().train.shape[1:] == (3, 8, 8)
    np.savez(tmp_path / "gray.npz", pixels=images[:, 0])
    assert NpzArrays(str(tmp_path / "gray.npz")).load().train.shape[1:] == (1, 8, 8)


def test_npz_float_vectors_keep_their_values(tmp_path):
    vectors = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float64)
    np.savez(tmp_path / "v.npz", points=vectors, labels=np.arange(30) % 3)
    data = NpzArrays(str(tmp_path / "v.npz"), key="points", labels_key="labels",
                     modality="vector", scale="none")
    splits = data.load()
    assert data.modality == "points" and splits.train.dtype == torch.float32
    both = torch.cat([splits.train, splits.heldout]).double()
    assert torch.allclose(both.sort(0).values, torch.from_numpy(vectors).sort(0).values,
                          atol=1e-6)
    unit = np.random.default_rng(3).random((10, 2))
    np.save(tmp_path / "u.npy", unit)
    scaled = NpzArrays(str(tmp_path / "u.npy"), modality="vector").load()
    assert scaled.train.min() >= -1 and scaled.train.max() <= 1
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        NpzArrays(str(tmp_path / "v.npz"), key="points", modality="vector").load()


def test_npz_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 1, 4, 4)), other=np.zeros(3))
    with pytest.raises(ValueError, match=r"'x' is not an array .*images, other"):
        NpzArrays(str(path), key="x").load()
    with pytest.raises(ValueError, match=r"its arrays are: images, other"):
        NpzArrays(str(path)).load()
    nan = np.zeros((4, 2))
    nan[1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan)
    with pytest.raises(ValueError, match=r"1 NaN or infinite"):
        NpzArrays(str(tmp_path / "nan.npz"), modality="vector", scale="none").load()
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"one label per example, shape \(4,\); found"):
        NpzArrays(str(tmp_path / "labels.npz"), labels_key="y", modality="vector").load()
    with pytest.raises(ValueError, match=r"\(N, d\).*found shape \(4, 1, 4, 4\)"):
        NpzArrays(str(path), key="images", modality="vector").load()
    with pytest.raises(OSError, match=r"missing.npz does not exist"):
        NpzArrays(str(tmp_path / "missing.npz")).load()
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"junk.npz is truncated or damaged"):
        NpzArrays(str(tmp_path / "junk.npz")).load()


# -- through the spec -----------------------------------------------------------------------
def test_spec_with_a_missing_image_folder_exits_2_naming_data(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    text = TINY_SPEC.replace("data: {kind: digits}",
                             f"data: {{kind: image_folder, path: '{missing}', size: 8}}")
    code, out, err = run_cli(["validate", "--build", str(write_spec(tmp_path, text))], capsys)
    flat = " ".join(err.split())
    assert code == 2, err
    assert " data:" in flat or " data " in flat, flat
    assert "no_such_folder" in flat and "does not exist" in flat
    assert "Traceback" not in err + out

"""Colour patches, image folders and array files: shapes, ranges, splits, labels and errors."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_kit.data import ImageFolder, NpzArrays, Patches, Photos
from diffusers_kit.data.patches import SKLEARN_PHOTOGRAPHS
from diffusers_kit.data.photos import SKIMAGE_PHOTOGRAPHS, SkimagePhoto
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


@pytest.mark.parametrize("data", [
    Patches(size=8, zoom=4, count=3000, seed=5),
    # scikit-image's photographs at 32 px, one of them gray and the smallest (chelsea) included
    Photos(size=32, zoom=2, count=1500, seed=5, images=["astronaut", "chelsea", "camera"]),
], ids=["patches", "photos"])
def test_train_and_heldout_patches_never_overlap(data):
    splits = data.load()
    train = {p.numpy().tobytes() for p in splits.train}
    assert not train & {p.numpy().tobytes() for p in splits.heldout}
    # spatially: no training crop shares a pixel with a held-out crop of the same photograph
    crop = data.crop
    for photo, record in enumerate(data.licences):
        h, w = record.shape
        covered = np.zeros((h, w), dtype=bool)
        for _, y, x in data.corners["heldout"][data.corners["heldout"][:, 0] == photo]:
            covered[y:y + crop, x:x + crop] = True
        assert 0 < covered.mean() < 0.5
        inside = np.zeros((h + 1, w + 1), dtype=np.int64)
        inside[1:, 1:] = covered.cumsum(0).cumsum(1)
        mine = data.corners["train"][data.corners["train"][:, 0] == photo]
        y, x = mine[:, 1], mine[:, 2]
        hits = (inside[y + crop, x + crop] - inside[y, x + crop] - inside[y + crop, x]
                + inside[y, x])
        assert len(mine) > 350 and (hits == 0).all()
    first = data.corners["train"][0]
    photo = np.asarray(Image.open(data.licences[first[0]].path()).convert("RGB"))
    window = photo[first[1]:first[1] + crop, first[2]:first[2] + crop].astype(np.float64)
    n, zoom = data.size, data.zoom
    expected = window.reshape(n, zoom, n, zoom, 3).mean((1, 3)).transpose(2, 0, 1) / 127.5 - 1
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


# -- photos (scikit-image's CC0 / public-domain photographs) -----------------------------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos():
    return Photos(size=32, count=400, seed=1).load()


def test_photos_are_colour_images_in_range_labelled_by_photograph(photos):
    assert photos.train.shape == (320, 3, 32, 32) and photos.heldout.shape == (80, 3, 32, 32)
    for split in (photos.train, photos.heldout):
        assert split.dtype == torch.float32 and split.min() >= -1 and split.max() <= 1
    assert photos.train.min() < -0.8 and photos.train.max() > 0.8
    assert (photos.train[:, 0] - photos.train[:, 2]).abs().mean() > 0.05  # colour, not gray
    assert set(photos.train_labels.tolist()) == set(photos.heldout_labels.tolist()) == {0, 1, 2, 3}
    assert torch.bincount(photos.train_labels).tolist() == [80, 80, 80, 80]
    big = Photos(size=64, count=40, seed=1).load()
    assert big.train.shape[1:] == (3, 64, 64) and big.heldout.shape[1:] == (3, 64, 64)
    assert Photos(size=9, zoom=3, count=20).load().train.shape[1:] == (3, 9, 9)  # any size


def test_photos_are_seeded(photos):
    again = Photos(size=32, count=400, seed=1).load()
    assert torch.equal(again.train, photos.train) and torch.equal(again.heldout, photos.heldout)
    assert torch.equal(again.train_labels, photos.train_labels)
    other = Photos(size=32, count=400, seed=2).load()
    assert not torch.equal(other.train, photos.train)
    assert not torch.equal(other.heldout, photos.heldout)


def test_gray_photographs_repeat_their_channel():
    gray = Photos(size=16, count=60, images=["camera", "grass"]).load()
    for split in (gray.train, gray.heldout):
        assert torch.equal(split[:, 0], split[:, 1]) and torch.equal(split[:, 0], split[:, 2])
    assert (gray.train.flatten(1).std(1) > 0.05).float().mean() > 0.3  # not flat


def test_a_crop_too_large_for_a_photograph_is_refused_with_the_largest():
    with pytest.raises(ValueError, match=r"size \* zoom at most 150 .*chelsea 300 x 451"):
        Photos(size=64, zoom=4)
    Photos(size=75, zoom=2, count=10, images=["chelsea"]).load()  # 150 fits
    with pytest.raises(ValueError, match=r"at most 150"):
        Photos(size=151, zoom=1, images=["chelsea"])
    # 512 x 512: two blocks of 1.5 crops across hold crops of 171 pixels
    Photos(size=57, zoom=3, count=10, images=["astronaut"]).load()
    with pytest.raises(ValueError, match=r"at most 171 for the photographs astronaut 512 x 512"):
        Photos(size=86, zoom=2, images=["astronaut"])


def test_held_out_share_of_each_photograph():
    """docs/data.md: 64-pixel crops give chelsea 2 of 12 blocks held out and astronaut 5 of 25;
    128-pixel crops leave chelsea 2 blocks, one held out."""
    for size, name, share in ((32, "chelsea", 2 / 12), (32, "astronaut", 5 / 25),
                              (64, "chelsea", 1 / 2), (64, "astronaut", 1 / 4)):
        data = Photos(size=size, zoom=2, images=[name])
        mask = data.heldout_mask(data.licences[0].shape, np.random.default_rng(0))
        assert mask.mean() == pytest.approx(share, abs=0.02), (size, name)


def _refuse_the_network(monkeypatch):
    import socket
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args} {kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_photos_load_without_the_network_or_pooch(monkeypatch):
    _refuse_the_network(monkeypatch)
    monkeypatch.setitem(sys.modules, "pooch", None)  # `import pooch` now fails
    names = list(SKIMAGE_PHOTOGRAPHS)
    data = Photos(size=8, zoom=4, count=10 * len(names), images=names).load()
    assert set(data.train_labels.tolist()) == set(range(len(names)))


def test_photographs_are_scikit_images_own_with_the_licence_it_states(monkeypatch):
    """The files decoded here are what ``skimage.data`` returns (with the network refused),
    and each record's licence is the one its ``skimage.data`` docstring states."""
    _refuse_the_network(monkeypatch)
    from skimage import data as skimage_data

    assert set(typing.get_args(SkimagePhoto)) == set(SKIMAGE_PHOTOGRAPHS)
    for name, record in SKIMAGE_PHOTOGRAPHS.items():
        theirs, ours = getattr(skimage_data, name)(), record.load()
        assert ours.shape == (*record.shape, 3) and theirs.shape[:2] == record.shape, name
        assert record.grayscale == (theirs.ndim == 2), name
        expected = np.repeat(theirs[..., None], 3, axis=2) if record.grayscale else theirs
        assert np.array_equal(ours, expected), name
        stated = " ".join(getattr(skimage_data, name).__doc__.split())
        assert record.licence in ("CC0 1.0", "public domain"), name
        assert ("CC0" if record.licence == "CC0 1.0" else "public domain") in stated, name


def test_every_photograph_used_has_its_licence(photos):
    used = Photos(images=["rocket", "camera"])
    assert [r.name for r in used.licences] == ["rocket", "camera"]
    assert [r.name for r in Photos().licences] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert [r.licence for r in Patches().licences] == ["CC BY 2.0", "CC BY 2.0"]
    # scikit-learn's records say what its README says
    readme = (Patches().licences[0].path().parent / "README.txt").read_text()
    for record in SKLEARN_PHOTOGRAPHS.values():
        assert f"Image: {record.file}" in readme and record.source in readme
        assert record.licence_url in readme


def test_the_data_page_credits_every_photograph():
    page = " ".join((ROOT / "docs" / "data.md").read_text(encoding="utf-8").split())
    for record in (*SKIMAGE_PHOTOGRAPHS.values(), *SKLEARN_PHOTOGRAPHS.values()):
        row = f"| `{record.name}` | {record.title} | {record.author} | {record.licence} |"
        assert row in page, row


def test_a_missing_scikit_image_is_exit_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    from diffusers_kit.data import base as module  # package_file looks the package up

    real = module.find_spec
    monkeypatch.setattr(module, "find_spec",
                        lambda name, *a: None if name == "skimage" else real(name, *a))
    spec = write_spec(tmp_path, TINY_SPEC.replace("data: {kind: digits}",
                                                  "data: {kind: photos, size: 8, zoom: 1}"))
    for command in (["validate", str(spec)], ["run", str(spec), "--quiet"]):
        code, out, err = run_cli(command, capsys)
        text = " ".join(err.split())
        assert code == 2 and "Traceback" not in out + err, command
        assert "data" in text and "pip install diffusers_kit[photos]" in text, command
    assert not (tmp_path / "runs").exists(), "refused before any run folder"


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


def test_the_digits_read_without_scikit_learn_equal_load_digits():
    """Digits reads scikit-learn's CSV file itself (importing scikit-learn costs ~2 s per
    command); the images and labels are load_digits' exactly."""
    from sklearn.datasets import load_digits

    from diffusers_kit.data.digits import read_digits

    pixels, labels = read_digits()
    bunch = load_digits()
    assert np.array_equal(pixels.reshape(-1, 8, 8), bunch.images)
    assert np.array_equal(labels, bunch.target) and labels.dtype == np.int64

"""FID / KID with the FID Inception network (diffusers_kit.metrics.inception), offline: the
network is torch-fidelity's, with random weights saved to a local file and loaded through the
metric's own loading code."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics import inception
from diffusers_kit.metrics.fd import frechet_distance

needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity is not installed")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight FID Inception network's state dict, saved as the weights file would be
    (the class is built without loading anything: its loader is bypassed for this one)."""
    network_class = inception.inception_class()
    torch.manual_seed(0)
    original = torch.nn.Module.load_state_dict
    try:
        torch.nn.Module.load_state_dict = lambda self, state, *a, **k: None  # type: ignore
        built = network_class("inception-v3-compat", ["2048"],
                              feature_extractor_weights_path=str(_empty(tmp_path_factory)))
    finally:
        torch.nn.Module.load_state_dict = original  # type: ignore
    # BatchNorm statistics of random images, so that the signal survives the 94 layers (with
    # the initial ones every input gives the same features)
    for module in built.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average
    built.train()
    with torch.no_grad():
        built((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8))
    built.eval()
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(built.state_dict(), path)
    return path, built


def _empty(factory):
    path = factory.mktemp("empty") / "empty.pth"
    torch.save({}, path)
    return path


def digits(n: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1 + shift).clamp(-1, 1)


@needs_fidelity
def test_features_are_those_of_the_network_called_directly(weights):
    path, built = weights
    space = inception.InceptionSpace(str(path), -1.0, 1.0)
    x = digits(3)
    features = space.embed(x)
    assert features.shape == (3, 2048)
    # by hand: [-1, 1] -> 0..255, gray to RGB, the network's own forward (resize to 299 inside)
    images = ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    with torch.no_grad():
        direct = built.eval()(images)[0].double()
    torch.testing.assert_close(features, direct, rtol=0, atol=0)


@needs_fidelity
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift_and_both_metrics_run(weights):
    path, _ = weights
    space = inception.InceptionSpace(str(path), -1.0, 1.0)
    same = space.embed(digits(4))
    spread = float(same.var(dim=0).sum())  # tr(S), the scale of FD's terms
    # 0 up to the rounding of a rank-3 covariance's square root in 2048 dimensions
    assert abs(frechet_distance(same, same)) < 1e-5 * spread
    # the metrics end to end (4 images a set): shifted samples are far beyond the floor
    data = DataSplits(train=digits(4, seed=1), heldout=digits(4, seed=2))
    fid = inception.InceptionFrechetDistance(weights=str(path), resamples=0)
    out = fid.evaluate(digits(4, shift=0.8, seed=3), data, torch.Generator().manual_seed(0))
    assert {"fid_inception", "fid_inception_floor", "fid_inception_n"} <= set(out)
    assert out["fid_inception_n"] == 4
    assert out["fid_inception"] > 5 * out["fid_inception_floor"] > 0
    kid = inception.InceptionKernelDistance(weights=str(path), subsets=2, resamples=0)
    out = kid.evaluate(digits(4, seed=3), data, torch.Generator().manual_seed(0))
    assert {"kid_inception", "kid_inception_std", "kid_inception_floor"} <= set(out)


def test_without_weights_or_network_the_error_says_how_to_provide_the_file(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache

    def offline(url, path):
        raise OSError("network unreachable")

    monkeypatch.setattr(inception, "_download", offline)
    with pytest.raises(ValueError, match="weights:.*" + str(tmp_path)):
        inception.weights_file(None)
    with pytest.raises(ValueError, match="no file"):
        inception.weights_file(tmp_path / "missing.pth")


@needs_fidelity
def test_a_file_of_other_weights_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not hold the FID Inception"):
        inception.load_inception(path)

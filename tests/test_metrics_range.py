"""Samples outside the data's range: flagged by the run, and clamped before feature metrics
see them (a normalising feature network would otherwise call garbage at +-80 perfect)."""

from __future__ import annotations

import torch

from diffusers_kit import Diffusion, NoiseAwareClassifier
from diffusers_kit.data.base import DataSplits
from diffusers_kit.graph import out_of_range
from diffusers_kit.metrics.features import FeatureSpace
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes import VE


def test_out_of_range_share():
    train = torch.rand(100, 1, 4, 4) * 2 - 1  # in [-1, 1]
    good = train[:10].clone()
    assert out_of_range(good, train) == {}
    bad = good.clone()
    bad[:3, 0, 0, 0] = 80.0
    bad[3, 0, 1, 1] = float("nan")
    assert out_of_range(bad, train) == {"out_of_range": 0.4}
    slightly = good.clone()
    slightly[0, 0, 0, 0] = float(train.max()) + 0.45  # an overshoot within 25 % of the range
    assert out_of_range(slightly, train) == {}


def test_feature_space_clamps_to_its_training_range():
    torch.manual_seed(0)
    train = torch.rand(64, 1, 8, 8) * 2 - 1
    data = DataSplits(train=train, heldout=train[:16])
    network = NoiseAwareClassifier(num_classes=3, channels=8, data_shape=(1, 8, 8)).eval()
    space = FeatureSpace(TrainedModel.from_diffusion(Diffusion(VE(), network, device="cpu"),
                                                     data))
    garbage = 80 * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(space.embed(garbage), space.embed(garbage.clamp(-1, 1)))
    assert not torch.allclose(space.embed(garbage), space.embed(garbage / 80))

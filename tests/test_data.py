"""Toy 2-D data sets: seeded, split, on the shapes they promise; digits carry their labels."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.data import Checkerboard, Digits, GaussianMixture, SwissRoll, TwoMoons


@pytest.mark.parametrize("factory", [TwoMoons, SwissRoll, Checkerboard, GaussianMixture])
def test_toy_sets_are_seeded_points_in_a_bounded_box(factory):
    a, b = factory(n_train=500, n_heldout=100).load(), factory(n_train=500, n_heldout=100).load()
    assert factory.modality == "points"
    assert a.train.shape == (500, 2) and a.heldout.shape == (100, 2)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    other = factory(n_train=500, n_heldout=100, seed=1).load()
    assert not torch.equal(a.train, other.train)
    assert a.train.abs().max() < 3.5


def test_two_moons_lie_on_their_two_circles():
    points = TwoMoons(n_train=4000, n_heldout=1, noise=0.0).load().train / 1.5
    points = points + torch.tensor([0.5, 0.25])
    upper = (points.norm(dim=1) - 1).abs() < 1e-5
    lower = ((points - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 1e-5
    assert bool((upper | lower).all())
    assert abs(upper.float().mean().item() - 0.5) < 6 * math.sqrt(0.25 / 4000)


def test_checkerboard_fills_only_the_dark_squares_evenly():
    points = Checkerboard(n_train=8000, n_heldout=1).load().train
    cell = torch.floor(points + 2).long()  # 0..3 in each coordinate
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all()), "one colour of the board only"
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)[
        ((torch.arange(16) // 4 + torch.arange(16) % 4) % 2 == 0)]
    expected = 8000 / 8
    assert bool(((counts - expected).abs() < 6 * math.sqrt(expected)).all()), counts


def test_gaussian_mixture_components_have_their_mean_and_std():
    data = GaussianMixture(components=4, radius=2.0, std=0.2, n_train=8000, n_heldout=1)
    points = data.load().train
    nearest = torch.cdist(points, data.means()).argmin(1)
    for k in range(4):
        mine = points[nearest == k]
        n = len(mine)
        assert abs(n - 2000) < 6 * math.sqrt(8000 * 0.25 * 0.75)
        assert (mine.mean(0) - data.means()[k]).abs().max() < 6 * 0.2 / math.sqrt(n)
        assert (mine.std(0) - 0.2).abs().max() < 6 * 0.2 / math.sqrt(2 * n)


def test_digits_come_with_labels_that_match_their_split():
    splits = Digits().load()
    assert splits.train_labels.shape == (len(splits.train),)
    assert splits.heldout_labels.shape == (len(splits.heldout),)
    assert set(splits.train_labels.tolist()) == set(range(10))
    assert Digits.num_classes == 10

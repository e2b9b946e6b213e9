"""Tests of the example plugin's own components (run with pytest from this folder)."""

import torch
from dkit_example import Bars, MomentGap


def test_bars_are_rows_or_columns():
    data = Bars(count=200, max_bars=1).load()
    images = (data.train[:, 0] > 0).float()
    rows_full = (images.sum(2) == 8).sum(1)  # full rows per image
    cols_full = (images.sum(1) == 8).sum(1)
    assert torch.all((rows_full == 1) ^ (cols_full == 1))


def test_moment_gap_is_zero_for_identical_sets_and_positive_otherwise():
    data = Bars(count=200).load()
    metric = MomentGap()
    same = metric.evaluate(data.heldout, data, torch.Generator())
    assert same["mean_gap"] == 0 and same["std_gap"] == 0
    shifted = metric.evaluate(data.heldout + 0.5, data, torch.Generator())
    assert abs(shifted["mean_gap"] - 0.5) < 1e-9

"""The share of samples outside the training data's range: a check every evaluation adds."""

from __future__ import annotations

import torch


def out_of_range(samples: torch.Tensor, train: torch.Tensor, tolerance: float = 0.25
                 ) -> dict[str, float]:
    """``{"out_of_range": share}``: the share of samples with a value beyond the training
    data's range by more than ``tolerance`` of that range, or not finite (only when some are:
    a diverged sampler shows here even when a metric that clamps or normalises would not;
    the overshoot of an unclipped sampler, a few tenths, does not)."""
    low, high = float(train.min()), float(train.max())
    margin = tolerance * (high - low)
    flat = samples.detach().float().cpu().flatten(1)
    outside = ((flat < low - margin) | (flat > high + margin) | ~torch.isfinite(flat)).any(1)
    share = float(outside.double().mean()) if len(flat) else 0.0
    return {"out_of_range": share} if share > 0 else {}

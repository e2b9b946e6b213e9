"""PSNR and SSIM of restorations against their held-out originals, by independent routes."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics import PSNR, SSIM


def images(seed: int, n: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_per_image_is_ten_log10_range_squared_over_mse():
    truth = images(0)
    noise = 0.1 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    restored = truth + noise  # some pixels leave [-1, 1]: they are not clipped
    data = DataSplits(train=truth, heldout=truth)
    out = PSNR(resamples=500).evaluate(restored, data, torch.Generator().manual_seed(0))
    mse = (restored.double() - truth.double()).pow(2).flatten(1).mean(1)
    per_image = 10 * torch.log10(2.0**2 / mse)  # range R = high - low = 2
    # torchmetrics holds the range in float32: agreement to 1e-6, far below a wrong factor
    assert out["psnr"] == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert out["psnr_std"] == pytest.approx(float(per_image.std(unbiased=False)), rel=1e-4)
    assert out["psnr_low"] < out["psnr"] < out["psnr_high"]
    assert out["psnr_n"] == 64


def test_ssim_is_one_for_identical_images_and_falls_with_noise_and_with_a_shift():
    truth = images(2)
    data = DataSplits(train=truth, heldout=truth)
    metric = SSIM(resamples=100)
    g = torch.Generator().manual_seed(0)
    assert metric.evaluate(truth, data, g)["ssim"] == pytest.approx(1.0, abs=1e-9)
    noisy = truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(3))
    assert metric.evaluate(noisy, data, g)["ssim"] < 0.9


def test_ssim_of_constant_images_follows_the_luminance_term():
    # constant images have no variance or covariance: SSIM = (2 mu_x mu_y + C1)/(mu_x^2 + mu_y^2
    # + C1) (the structure term is (0 + C2)/(0 + C2) = 1), with C1 = (0.01 R)^2, R = 2
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.full((4, 1, 8, 8), -0.25)
    data = DataSplits(train=y, heldout=y)
    c1 = (0.01 * 2) ** 2
    mx, my = 0.5, -0.25  # negative luminance product: SSIM < 0
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    out = SSIM(resamples=0).evaluate(x, data, torch.Generator().manual_seed(0))
    assert out["ssim"] == pytest.approx(expected, rel=1e-6)
    assert math.isnan(out["ssim_low"])  # resamples 0: no interval


def test_restoration_metrics_refuse_vectors_and_bad_settings():
    data = DataSplits(train=torch.zeros(4, 3), heldout=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="compares images"):
        PSNR().evaluate(torch.zeros(4, 3), data, torch.Generator())
    with pytest.raises(ValueError, match="kernel_size: expected an odd window width, given 4"):
        SSIM(kernel_size=4)
    with pytest.raises(ValueError, match="must exceed low"):
        PSNR(low=1.0, high=0.0)

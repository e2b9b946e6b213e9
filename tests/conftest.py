"""Shared test set-up: hypothesis profiles and small helpers.

Profiles: ``ci`` (default; quick, derandomized so CI never flakes) and ``thorough``
(many more examples; run with ``HYPOTHESIS_PROFILE=thorough pytest``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread: small tensors run fastest so, and bit-identity tests need a fixed reduction order.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test's own computations, as in the processes it starts (the
    torchrun and training children): the same kernels, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

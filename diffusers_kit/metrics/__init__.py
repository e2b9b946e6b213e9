"""Sample-quality metrics (kind ``metric``)."""

from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.swd import SlicedWasserstein, sliced_wasserstein

REGISTER = [
    ("metric", "swd", SlicedWasserstein),
]

__all__ = ["REGISTER", "Metric", "SlicedWasserstein", "sliced_wasserstein"]

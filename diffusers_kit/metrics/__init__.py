"""Sample-quality metrics (kind ``metric``)."""

from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.nll import NegativeLogLikelihood
from diffusers_kit.metrics.swd import SlicedWasserstein, sliced_wasserstein

REGISTER = [
    ("metric", "swd", SlicedWasserstein),
    ("metric", "nll", NegativeLogLikelihood),
]

__all__ = ["REGISTER", "Metric", "NegativeLogLikelihood", "SlicedWasserstein",
           "sliced_wasserstein"]

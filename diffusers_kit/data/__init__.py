"""Data sets (kind ``dataset``)."""

from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.data.digits import Digits
from diffusers_kit.data.toy2d import Checkerboard, GaussianMixture, SwissRoll, Toy2D, TwoMoons

REGISTER = [
    ("dataset", "digits", Digits),
    ("dataset", "two_moons", TwoMoons),
    ("dataset", "swiss_roll", SwissRoll),
    ("dataset", "checkerboard", Checkerboard),
    ("dataset", "gaussian_mixture", GaussianMixture),
]

__all__ = ["REGISTER", "Checkerboard", "DataSplits", "Dataset", "Digits", "GaussianMixture",
           "SwissRoll", "Toy2D", "TwoMoons"]

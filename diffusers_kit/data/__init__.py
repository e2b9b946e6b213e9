"""Data sets (kind ``dataset``)."""

from diffusers_kit.data.arrays import NpzArrays
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.data.digits import Digits
from diffusers_kit.data.folder import ImageFolder
from diffusers_kit.data.patches import Patches
from diffusers_kit.data.toy2d import Checkerboard, GaussianMixture, SwissRoll, Toy2D, TwoMoons

REGISTER = [
    ("dataset", "digits", Digits),
    ("dataset", "two_moons", TwoMoons),
    ("dataset", "swiss_roll", SwissRoll),
    ("dataset", "checkerboard", Checkerboard),
    ("dataset", "gaussian_mixture", GaussianMixture),
    ("dataset", "patches", Patches),
    ("dataset", "image_folder", ImageFolder),
    ("dataset", "npz", NpzArrays),
]

__all__ = ["REGISTER", "Checkerboard", "DataSplits", "Dataset", "Digits", "GaussianMixture",
           "ImageFolder", "NpzArrays", "Patches", "SwissRoll", "Toy2D", "TwoMoons"]

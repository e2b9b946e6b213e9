"""Data sets (kind ``data``)."""

from diffusers_kit.data.arrays import NpzArrays
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.data.digits import Digits
from diffusers_kit.data.folder import ImageFolder
from diffusers_kit.data.patches import Patches, PhotoPatches, PhotoRecord
from diffusers_kit.data.photos import Photos
from diffusers_kit.data.toy2d import Checkerboard, GaussianMixture, SwissRoll, Toy2D, TwoMoons

REGISTER = [
    ("data", "digits", Digits),
    ("data", "two_moons", TwoMoons),
    ("data", "swiss_roll", SwissRoll),
    ("data", "checkerboard", Checkerboard),
    ("data", "gaussian_mixture", GaussianMixture),
    ("data", "patches", Patches),
    ("data", "photos", Photos),
    ("data", "image_folder", ImageFolder),
    ("data", "npz", NpzArrays),
]

__all__ = ["REGISTER", "Checkerboard", "DataSplits", "Dataset", "Digits", "GaussianMixture",
           "ImageFolder", "NpzArrays", "Patches", "PhotoPatches", "PhotoRecord", "Photos",
           "SwissRoll", "Toy2D", "TwoMoons"]

"""Data sets (kind ``dataset``)."""

from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.data.digits import Digits

REGISTER = [
    ("dataset", "digits", Digits),
]

__all__ = ["REGISTER", "DataSplits", "Dataset", "Digits"]

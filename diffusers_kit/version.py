"""The dkit version (a leaf: the run layer records it in training hashes)."""

__version__ = "0.2.0"

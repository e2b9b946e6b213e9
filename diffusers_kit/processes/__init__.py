"""Noise processes: one file per family, all built on :mod:`diffusers_kit.processes.base`.

``REGISTER`` lists what the built-in plugin registers from this package.
"""

from diffusers_kit.processes.base import NoiseProcess, expand
from diffusers_kit.processes.ve import VE

REGISTER = [
    ("process", "ve", VE),
]

__all__ = ["REGISTER", "VE", "NoiseProcess", "expand"]

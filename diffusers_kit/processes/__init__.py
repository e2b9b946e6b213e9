"""Noise processes: one file per family, all built on :mod:`diffusers_kit.processes.base`.

``REGISTER`` lists what the built-in plugin registers from this package.
"""

from diffusers_kit.processes.base import NoiseProcess, expand
from diffusers_kit.processes.constant_sigma import ConstantSigma
from diffusers_kit.processes.ddpm import DDPM
from diffusers_kit.processes.diffusers_flow import DiffusersFlow
from diffusers_kit.processes.diffusers_scheduler import DiffusersSchedule
from diffusers_kit.processes.flow import Flow
from diffusers_kit.processes.ou import OU
from diffusers_kit.processes.ve import VE
from diffusers_kit.processes.vp import VP, SubVP, VariancePreserving

REGISTER = [
    ("process", "ve", VE),
    ("process", "vp", VP),
    ("process", "subvp", SubVP),
    ("process", "ddpm", DDPM),
    ("process", "constant_sigma", ConstantSigma),
    ("process", "ou", OU),
    ("process", "diffusers_scheduler", DiffusersSchedule),
    ("process", "flow", Flow),
    ("process", "diffusers_flow", DiffusersFlow),
]

__all__ = [
    "DDPM",
    "OU",
    "REGISTER",
    "VE",
    "VP",
    "ConstantSigma",
    "DiffusersFlow",
    "DiffusersSchedule",
    "Flow",
    "NoiseProcess",
    "SubVP",
    "VariancePreserving",
    "expand",
]

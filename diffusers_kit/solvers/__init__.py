"""Samplers and solvers (kind ``solver``)."""

from diffusers_kit.solvers.base import Recorder, SampleResult, Solver
from diffusers_kit.solvers.langevin import AnnealedLangevin, Langevin

REGISTER = [
    ("solver", "annealed_langevin", AnnealedLangevin),
    ("solver", "langevin", Langevin),
]

__all__ = ["REGISTER", "AnnealedLangevin", "Langevin", "Recorder", "SampleResult", "Solver"]

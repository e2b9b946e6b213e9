"""Samplers and solvers (kind ``solver``)."""

from diffusers_kit.solvers.base import SampleResult, Solver
from diffusers_kit.solvers.langevin import AnnealedLangevin

REGISTER = [
    ("solver", "annealed_langevin", AnnealedLangevin),
]

__all__ = ["REGISTER", "AnnealedLangevin", "SampleResult", "Solver"]

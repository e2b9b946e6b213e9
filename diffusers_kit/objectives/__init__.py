"""Training objectives (kind ``objective``)."""

from diffusers_kit.objectives.base import Objective
from diffusers_kit.objectives.dsm import DenoisingScoreMatching

REGISTER = [
    ("objective", "dsm", DenoisingScoreMatching),
]

__all__ = ["REGISTER", "DenoisingScoreMatching", "Objective"]

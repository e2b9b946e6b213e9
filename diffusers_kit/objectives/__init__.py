"""Training objectives (kind ``objective``)."""

from diffusers_kit.objectives.base import Objective
from diffusers_kit.objectives.classification import NoisyClassification
from diffusers_kit.objectives.consistency import ConsistencyDistillation
from diffusers_kit.objectives.ddpm import HybridLoss, SimpleLoss, VariationalBound
from diffusers_kit.objectives.denoising import Denoising, EDMLoss, FlowMatching
from diffusers_kit.objectives.dsm import DenoisingScoreMatching
from diffusers_kit.objectives.progressive import ProgressiveDistillation
from diffusers_kit.objectives.reconstruction import Reconstruction
from diffusers_kit.objectives.score_matching import ImplicitScoreMatching, SlicedScoreMatching

REGISTER = [
    ("objective", "dsm", DenoisingScoreMatching),
    ("objective", "ism", ImplicitScoreMatching),
    ("objective", "ssm", SlicedScoreMatching),
    ("objective", "ddpm_simple", SimpleLoss),
    ("objective", "ddpm_vlb", VariationalBound),
    ("objective", "ddpm_hybrid", HybridLoss),
    ("objective", "classification", NoisyClassification),
    ("objective", "reconstruction", Reconstruction),
    ("objective", "denoising", Denoising),
    ("objective", "flow_matching", FlowMatching),
    ("objective", "edm", EDMLoss),
    ("objective", "consistency_distillation", ConsistencyDistillation),
    ("objective", "progressive_distillation", ProgressiveDistillation),
]

__all__ = [
    "REGISTER",
    "ConsistencyDistillation",
    "Denoising",
    "DenoisingScoreMatching",
    "EDMLoss",
    "FlowMatching",
    "HybridLoss",
    "ImplicitScoreMatching",
    "NoisyClassification",
    "Objective",
    "ProgressiveDistillation",
    "Reconstruction",
    "SimpleLoss",
    "SlicedScoreMatching",
    "VariationalBound",
]

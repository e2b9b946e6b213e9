"""Guidance terms (kind ``guidance``): classifier-free, classifier, and the base classes a
plugin subclasses (see :mod:`diffusers_kit.guidance.base`)."""

from diffusers_kit.guidance.base import (
    Evaluate,
    GradientGuidance,
    Guidance,
    Interval,
    LabelsError,
    add_score,
    noise_level,
    requested_labels,
)
from diffusers_kit.guidance.classifier import ClassifierGuidance
from diffusers_kit.guidance.classifier_free import ClassifierFree
from diffusers_kit.guidance.ddrm import DDRM
from diffusers_kit.guidance.measurement import (
    DDNM,
    DPS,
    DDNMPlus,
    DiffPIR,
    MeasurementGuidance,
    PiGDM,
    Replacement,
)

REGISTER = [
    ("guidance", "classifier_free", ClassifierFree),
    ("guidance", "classifier", ClassifierGuidance),
    ("guidance", "replacement", Replacement),
    ("guidance", "pigdm", PiGDM),
    ("guidance", "dps", DPS),
    ("guidance", "diffpir", DiffPIR),
    ("guidance", "ddrm", DDRM),
    ("guidance", "ddnm", DDNM),
    ("guidance", "ddnm_plus", DDNMPlus),
]

__all__ = [
    "DDNM",
    "DDRM",
    "DPS",
    "REGISTER",
    "ClassifierFree",
    "ClassifierGuidance",
    "DDNMPlus",
    "DiffPIR",
    "Evaluate",
    "GradientGuidance",
    "Guidance",
    "Interval",
    "LabelsError",
    "MeasurementGuidance",
    "PiGDM",
    "Replacement",
    "add_score",
    "noise_level",
    "requested_labels",
]

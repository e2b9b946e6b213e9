"""Sample-quality metrics (kind ``metric``).

Distribution metrics (``swd``, ``fd``, ``kid``, ``prdc``, ``class_accuracy``) report every figure
beside its noise floor and with a bootstrap interval (:mod:`diffusers_kit.metrics.floor`); those
computed in a feature space name a trained classifier (:mod:`diffusers_kit.metrics.features`).
"""

from diffusers_kit.metrics.accuracy import Accuracy
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.class_accuracy import ClassAccuracy
from diffusers_kit.metrics.clip import CLIPScore
from diffusers_kit.metrics.consistency import Consistency
from diffusers_kit.metrics.fd import FrechetDistance, frechet_distance
from diffusers_kit.metrics.features import FeatureSpace
from diffusers_kit.metrics.floor import ErrorBars, compare_with_floor, mean_with_interval
from diffusers_kit.metrics.inception import InceptionFrechetDistance, InceptionKernelDistance
from diffusers_kit.metrics.kid import KernelDistance, kernel_distance
from diffusers_kit.metrics.nll import NegativeLogLikelihood
from diffusers_kit.metrics.prdc import PrecisionRecall, prdc
from diffusers_kit.metrics.reconstruction import ReconstructionQuality
from diffusers_kit.metrics.restoration import PSNR, SSIM
from diffusers_kit.metrics.swd import SlicedWasserstein, sliced_wasserstein

REGISTER = [
    ("metric", "swd", SlicedWasserstein),
    ("metric", "nll", NegativeLogLikelihood),
    ("metric", "fd", FrechetDistance),
    ("metric", "kid", KernelDistance),
    ("metric", "prdc", PrecisionRecall),
    ("metric", "fid_inception", InceptionFrechetDistance),
    ("metric", "kid_inception", InceptionKernelDistance),
    ("metric", "clip_score", CLIPScore),
    ("metric", "class_accuracy", ClassAccuracy),
    ("metric", "accuracy", Accuracy),
    ("metric", "psnr", PSNR),
    ("metric", "ssim", SSIM),
    ("metric", "consistency", Consistency),
    ("metric", "reconstruction", ReconstructionQuality),
]

__all__ = ["PSNR", "REGISTER", "SSIM", "Accuracy", "CLIPScore", "ClassAccuracy", "Consistency",
           "ErrorBars",
           "FeatureSpace",
           "FrechetDistance", "InceptionFrechetDistance", "InceptionKernelDistance",
           "KernelDistance", "Metric", "NegativeLogLikelihood",
           "PrecisionRecall", "ReconstructionQuality", "SlicedWasserstein", "compare_with_floor",
           "frechet_distance",
           "kernel_distance", "mean_with_interval", "prdc", "sliced_wasserstein"]

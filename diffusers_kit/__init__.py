"""diffusers_kit: declarative, plugin-based diffusion and score-based generative models.

The public Python API (re-exports only). See :class:`Diffusion` for composing a model in Python,
and ``dkit run SPEC`` for the same thing from a YAML spec.
"""

from diffusers_kit.api import Diffusion, resolve_device
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.data.digits import Digits
from diffusers_kit.data.toy2d import Checkerboard, GaussianMixture, SwissRoll, TwoMoons
from diffusers_kit.guidance import ClassifierFree, ClassifierGuidance, GradientGuidance, Guidance
from diffusers_kit.hookspecs import hookimpl
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.swd import SlicedWasserstein, sliced_wasserstein
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.networks.classifier import NoiseAwareClassifier
from diffusers_kit.networks.mlp import MLP
from diffusers_kit.networks.ncsn import NCSN
from diffusers_kit.networks.unet import UNet
from diffusers_kit.objectives.base import Objective
from diffusers_kit.objectives.classification import NoisyClassification
from diffusers_kit.objectives.ddpm import HybridLoss, SimpleLoss, VariationalBound
from diffusers_kit.objectives.dsm import DenoisingScoreMatching
from diffusers_kit.objectives.score_matching import ImplicitScoreMatching, SlicedScoreMatching
from diffusers_kit.optim import Adam, AdamW, Optimizer
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.processes.ve import VE
from diffusers_kit.registry import Registry, get_registry
from diffusers_kit.solvers.base import SampleResult, Solver
from diffusers_kit.solvers.langevin import AnnealedLangevin
from diffusers_kit.train import EMA, Trainer, TrainingDiverged, TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "MLP",
    "NCSN",
    "VE",
    "Adam",
    "AdamW",
    "AnnealedLangevin",
    "Checkerboard",
    "ClassifierFree",
    "ClassifierGuidance",
    "DataSplits",
    "Dataset",
    "DenoisingScoreMatching",
    "Diffusion",
    "Digits",
    "GaussianMixture",
    "GradientGuidance",
    "Guidance",
    "HybridLoss",
    "ImplicitScoreMatching",
    "Metric",
    "Network",
    "NoiseAwareClassifier",
    "NoiseProcess",
    "NoisyClassification",
    "Objective",
    "Optimizer",
    "Registry",
    "SampleResult",
    "ScoreModel",
    "SimpleLoss",
    "SlicedScoreMatching",
    "SlicedWasserstein",
    "Solver",
    "SwissRoll",
    "TrainedModel",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TwoMoons",
    "UNet",
    "VariationalBound",
    "__version__",
    "get_registry",
    "hookimpl",
    "resolve_device",
    "sliced_wasserstein",
]

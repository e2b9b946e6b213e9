"""Forward models (kind ``forward_model``): measurement operators ``y ~ p(y | A(x))`` for
inverse problems (Gaussian ``A(x) + sigma_y * n`` by default), one file per family, on the
protocol of :mod:`diffusers_kit.forward_models.base`; the noise models of
:mod:`diffusers_kit.forward_models.noise`; :class:`Compose` for ``A o B``."""

from diffusers_kit.forward_models.base import DENSE_LIMIT, ForwardModel, SigmaY
from diffusers_kit.forward_models.blur import GaussianBlur
from diffusers_kit.forward_models.colorize import Colorize
from diffusers_kit.forward_models.compose import Compose
from diffusers_kit.forward_models.denoise import Denoise
from diffusers_kit.forward_models.inpaint import Inpaint
from diffusers_kit.forward_models.matrix import MatrixOperator
from diffusers_kit.forward_models.noise import (
    GaussianNoise,
    NoiseModel,
    PoissonGaussianNoise,
    PoissonNoise,
)
from diffusers_kit.forward_models.super_resolution import SuperResolution

REGISTER = [
    ("forward_model", "inpaint", Inpaint),
    ("forward_model", "colorize", Colorize),
    ("forward_model", "super_resolution", SuperResolution),
    ("forward_model", "blur", GaussianBlur),
    ("forward_model", "matrix", MatrixOperator),
    ("forward_model", "denoise", Denoise),
]

__all__ = ["DENSE_LIMIT", "REGISTER", "Colorize", "Compose", "Denoise", "ForwardModel",
           "GaussianBlur", "GaussianNoise", "Inpaint", "MatrixOperator", "NoiseModel",
           "PoissonGaussianNoise", "PoissonNoise", "SigmaY", "SuperResolution"]

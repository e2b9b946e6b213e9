"""Networks (kind ``network``)."""

from diffusers_kit.networks.base import Network
from diffusers_kit.networks.classifier import NoiseAwareClassifier
from diffusers_kit.networks.diffusers_unet import DiffusersUNet
from diffusers_kit.networks.mlp import MLP
from diffusers_kit.networks.ncsn import NCSN
from diffusers_kit.networks.precond import ConsistencyPrecond, EDMPrecond
from diffusers_kit.networks.unet import UNet

REGISTER = [
    ("network", "ncsn", NCSN),
    ("network", "mlp", MLP),
    ("network", "unet", UNet),
    ("network", "classifier", NoiseAwareClassifier),
    ("network", "diffusers_unet", DiffusersUNet),
    ("network", "edm_precond", EDMPrecond),
    ("network", "consistency_precond", ConsistencyPrecond),
]

__all__ = ["MLP", "NCSN", "REGISTER", "ConsistencyPrecond", "DiffusersUNet", "EDMPrecond",
           "Network", "NoiseAwareClassifier", "UNet"]

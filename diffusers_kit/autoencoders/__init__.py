"""First stages for latent diffusion (kind ``autoencoder``)."""

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.autoencoders.kl import KLAutoencoder
from diffusers_kit.autoencoders.vq import VQAutoencoder

REGISTER = [
    ("autoencoder", "kl", KLAutoencoder),
    ("autoencoder", "vq", VQAutoencoder),
]

__all__ = ["REGISTER", "Autoencoder", "KLAutoencoder", "VQAutoencoder"]

"""First stages for latent diffusion (kind ``autoencoder``)."""

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.autoencoders.diffusers_vae import DiffusersVAE
from diffusers_kit.autoencoders.kl import KLAutoencoder
from diffusers_kit.autoencoders.vq import VQAutoencoder

REGISTER = [
    ("autoencoder", "kl", KLAutoencoder),
    ("autoencoder", "vq", VQAutoencoder),
    ("autoencoder", "diffusers_vae", DiffusersVAE),
]

__all__ = ["REGISTER", "Autoencoder", "DiffusersVAE", "KLAutoencoder", "VQAutoencoder"]

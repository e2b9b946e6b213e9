"""First stages for latent diffusion (kind ``autoencoder``)."""

from diffusers_kit.autoencoders.base import Autoencoder

REGISTER: list = []

__all__ = ["REGISTER", "Autoencoder"]

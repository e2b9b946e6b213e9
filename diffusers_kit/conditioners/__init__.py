"""Conditioners for cross-attention (kind ``conditioner``)."""

from diffusers_kit.conditioners.base import Conditioner

REGISTER: list = []

__all__ = ["REGISTER", "Conditioner"]

"""Networks (kind ``network``)."""

from diffusers_kit.networks.base import Network
from diffusers_kit.networks.ncsn import NCSN

REGISTER = [
    ("network", "ncsn", NCSN),
]

__all__ = ["NCSN", "REGISTER", "Network"]

"""Conditioners for cross-attention (kind ``conditioner``)."""

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.conditioners.class_tokens import ClassTokens
from diffusers_kit.conditioners.diffusers_text import DiffusersText
from diffusers_kit.conditioners.hf_text import HFTextEncoder
from diffusers_kit.conditioners.text import TextConditioner, WordTokenizer

REGISTER: list = [
    ("conditioner", "class_tokens", ClassTokens),
    ("conditioner", "text", TextConditioner),
    ("conditioner", "hf_text", HFTextEncoder),
    ("conditioner", "diffusers_text", DiffusersText),
]

__all__ = ["REGISTER", "ClassTokens", "Conditioner", "DiffusersText", "HFTextEncoder",
           "TextConditioner", "WordTokenizer"]

"""dkit-example: the template a third-party diffusers_kit plugin copies."""

from dkit_example.components import Bars, MomentGap
from dkit_example.guidance import Brightness

__all__ = ["Bars", "Brightness", "MomentGap"]

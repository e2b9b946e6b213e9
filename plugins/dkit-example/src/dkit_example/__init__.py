"""dkit-example: the template a third-party diffusers_kit plugin copies."""

from dkit_example.components import Bars, MomentGap

__all__ = ["Bars", "MomentGap"]

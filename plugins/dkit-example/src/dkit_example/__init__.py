"""dkit-example: the template a third-party diffusers_kit plugin copies."""

from dkit_example.components import Bars, MomentGap
from dkit_example.guidance import Brightness
from dkit_example.projection import ColumnSums

__all__ = ["Bars", "Brightness", "ColumnSums", "MomentGap"]

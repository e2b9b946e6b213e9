"""The plugin module named in the entry point: one ``dkit_register`` hook implementation."""

from __future__ import annotations

from diffusers_kit import hookimpl
from dkit_example.components import Bars, MomentGap
from dkit_example.guidance import Brightness
from dkit_example.projection import ColumnSums

# the dkit plugin API this module was written for: dkit refuses to load it, naming it, when it
# provides another one (``dkit plugins`` shows the API version of the dkit installed)
DKIT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def dkit_register(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("data", "bars", Bars)
    registry.add("metric", "moment_gap", MomentGap)
    registry.add("guidance", "brightness", Brightness)
    registry.add("forward_model", "column_sums", ColumnSums)

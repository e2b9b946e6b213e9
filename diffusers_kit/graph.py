"""Deprecated: the run graph's names, re-exported from :mod:`diffusers_kit.run` (their home
since 0.3) so that plugins and scripts written against 0.2 keep working. New code imports
from :mod:`diffusers_kit.run` (a hook's ``run`` is a :class:`diffusers_kit.run.Run`)."""

from __future__ import annotations

from diffusers_kit.metrics.range import out_of_range  # noqa: F401
from diffusers_kit.run import *  # noqa: F403  (every public name of the run package)
from diffusers_kit.run.build import check_metric_sizes  # noqa: F401
from diffusers_kit.run.resume import RESUMABLE_CHANGES  # noqa: F401
from diffusers_kit.run.stages import reconstructions_figure  # noqa: F401

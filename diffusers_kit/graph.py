"""Deprecated: the run graph's names, re-exported from :mod:`diffusers_kit.run` (their home
since 0.3) so that plugins and scripts written against 0.2 keep working. New code imports
from :mod:`diffusers_kit.run` (a hook's ``run`` is a :class:`diffusers_kit.run.Run`)."""

from __future__ import annotations

from diffusers_kit.metrics.range import out_of_range
from diffusers_kit.run.build import (
    Builder,
    Components,
    build_components,
    check_metric_sizes,
    open_run,
)
from diffusers_kit.run.execution import execute, parse_only
from diffusers_kit.run.resume import (
    RESUMABLE_CHANGES,
    check_resumable,
    load_previous,
    previous_differences,
)
from diffusers_kit.run.stages import (
    GRAPH,
    STAGES,
    Results,
    Run,
    Stage,
    checked_metric,
    evaluate_metrics,
    reconstructions_figure,
    summary_table,
)
from diffusers_kit.run.store import RunStore

__all__ = [
    "GRAPH", "RESUMABLE_CHANGES", "STAGES", "Builder", "Components", "Results", "Run",
    "RunStore", "Stage", "build_components", "check_metric_sizes", "check_resumable",
    "checked_metric", "evaluate_metrics", "execute", "load_previous", "open_run",
    "out_of_range", "parse_only", "previous_differences", "reconstructions_figure",
    "summary_table",
]

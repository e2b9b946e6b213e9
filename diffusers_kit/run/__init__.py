"""The run machinery: a validated spec becomes a run folder.

========================  =====================================================================
module                    job
========================  =====================================================================
:mod:`.build`             build the components, check them against each other (and the metrics
                          against the run's sizes); reopen a finished run
:mod:`.stages`            the stages (data, train, sample, restore, evaluate, report), the
                          :class:`Run` the hooks receive and its typed :class:`Results`
:mod:`.execution`         execute a spec: references built or reused, run folder, record, stages
:mod:`.resume`            weights from an earlier run: ``--from``, ``--resume``, reuse
:mod:`.store`             the model store that loads what a component's reference names
========================  =====================================================================

A run folder's layout is :mod:`diffusers_kit.run_folder`'s, the hashing and planning of model
references :mod:`diffusers_kit.spec.references`'s (both below this layer: spec validation reads
run folders). Importing this package installs the model store; importing ``diffusers_kit``
imports it.
"""

from __future__ import annotations

from diffusers_kit.run.build import Builder, Components, build_components, open_run
from diffusers_kit.run.execution import (
    BuildSettings,
    Dependency,
    build_reference,
    build_references,
    execute,
    parse_only,
)
from diffusers_kit.run.resume import check_resumable, load_previous, previous_differences
from diffusers_kit.run.stages import (
    GRAPH,
    STAGES,
    NonFiniteResult,
    Results,
    Run,
    Stage,
    checked_metric,
    evaluate_metrics,
    summary_table,
)
from diffusers_kit.run.store import RunStore

__all__ = [
    "GRAPH", "STAGES", "BuildSettings", "Builder", "Components", "Dependency", "NonFiniteResult",
    "Results", "Run",
    "RunStore", "Stage", "build_components", "build_reference", "build_references",
    "check_resumable", "checked_metric", "evaluate_metrics", "execute", "load_previous",
    "open_run", "parse_only", "previous_differences", "summary_table",
]

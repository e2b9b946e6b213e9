"""Deprecated: the names of 0.2's ``pipeline`` module, re-exported from their homes.

A reference (:mod:`diffusers_kit.references`) names a trained model by run folder or by spec;
spec validation plans it (:mod:`diffusers_kit.spec.references`: the referenced spec validated
and hashed). Here a planned reference is built: a finished run with its hash under the output
root is reused; otherwise the spec's train stage runs first, in its own run folder under the
same output root (:mod:`diffusers_kit.run.execution`). A lock file per hash makes two concurrent
``dkit run`` that need the same missing model train it once: the second waits, then reuses.
The run folder's layout, its record and ``latest`` are :mod:`diffusers_kit.run_folder`'s.

This module only re-exports those names from their homes (plugins and scripts written
against 0.2 import them from here); new code imports them from the modules named above.
"""

from __future__ import annotations

from diffusers_kit.references import (
    REFERENCE_FORMS,
    SPEC_SUFFIXES,
    ModelRef,
    ModelReferenceError,
    TrainedModel,
    is_model_annotation,
)
from diffusers_kit.run.execution import (
    BuildSettings,
    Dependency,
    build_reference,
    build_references,
)
from diffusers_kit.run_folder import (
    ALIVE,
    CHECKPOINT,
    LATEST,
    RUN_RECORD,
    SPEC_FILE,
    STATUSES,
    alive_marker,
    build_lock,
    find_finished,
    follow_latest,
    live_status,
    now,
    point_latest,
    read_record,
    run_folders,
    write_record,
)
from diffusers_kit.spec.references import (
    NOT_HASHED,
    TRAINING_SECTIONS,
    PlanFailed,
    check_references,
    find_run_folder,
    plan_reference,
    reference_fields,
    references,
    resolve_spec,
    spec_hash,
    spec_view,
    training_hash,
)

__all__ = [
    "ALIVE", "CHECKPOINT", "LATEST", "NOT_HASHED", "REFERENCE_FORMS", "RUN_RECORD", "SPEC_FILE",
    "SPEC_SUFFIXES", "STATUSES", "TRAINING_SECTIONS", "BuildSettings", "Dependency", "ModelRef",
    "ModelReferenceError", "PlanFailed", "TrainedModel", "alive_marker", "build_lock",
    "build_reference", "build_references", "check_references", "find_finished",
    "find_run_folder", "follow_latest", "is_model_annotation", "live_status", "now",
    "plan_reference", "point_latest", "read_record", "reference_fields", "references",
    "resolve_spec", "run_folders", "spec_hash", "spec_view", "training_hash", "write_record",
]

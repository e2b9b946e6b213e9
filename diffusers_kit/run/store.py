"""The model store the run layer installs: how a component's model reference is built and
loaded (:class:`diffusers_kit.references.ModelStore`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from diffusers_kit.references import LoadedModel, ModelReferenceError, TrainedModel, install_store
from diffusers_kit.run.build import open_run
from diffusers_kit.run.execution import build_reference
from diffusers_kit.spec.references import (
    PlanFailed,
    plan_reference,
)
from diffusers_kit.spec.validate import validate


class RunStore:
    """The :class:`~diffusers_kit.references.ModelStore` dkit uses: references are planned by
    spec validation, built (or reused) by :func:`build_reference` and loaded by
    :func:`open_run`. Installed when this module is imported."""

    def resolve(self, model: TrainedModel, *, root: Path, rebuild: bool, quiet: bool,
                console: Console | None) -> None:
        try:
            plan_reference(model, base=Path.cwd(), stack=(), validate=validate)
        except PlanFailed as exc:
            raise ModelReferenceError(exc.message) from None
        build_reference(model, root=root, rebuild=rebuild, console=console, quiet=quiet)

    def load(self, run_dir: Path) -> LoadedModel:
        spec, components = open_run(run_dir)
        return LoadedModel(spec, components.diffusion, components.data)


install_store(RunStore())

"""The plugin contract of diffusers_kit: every pluggy hook, documented in one place.

A plugin is a module (or object) with functions decorated by :data:`diffusers_kit.hookimpl`
whose names match the hooks below. Third-party distributions announce their plugin module in
the ``diffusers_kit`` entry-point group::

    [project.entry-points.diffusers_kit]
    my_plugin = "my_package.plugin"

The built-in components are registered by :mod:`diffusers_kit.builtin` through exactly the
same ``dkit_register`` hook; nothing is special-cased.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from diffusers_kit.registry import Registry

PROJECT = "diffusers_kit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dkit_register(registry: Registry) -> None:
    """Add component kinds and components to ``registry``.

    Call ``registry.add_kind(name, base_class, doc)`` to declare a new kind of component and
    ``registry.add(kind, name, factory)`` to register a component. The factory's constructor
    signature (type hints plus ``Annotated[..., Field(...)]`` constraints) is its spec schema.
    """


@hookspec
def dkit_run_started(run: Any) -> None:
    """Called once the run folder exists and the components are built (``run`` is a Run)."""


@hookspec
def dkit_train_step(run: Any, step: int, loss: float) -> None:
    """Called every ``train.log_every`` steps with the mean loss since the last call.

    ``loss`` is a host float; the engine synchronises only at these logging points.
    """


@hookspec
def dkit_samples_ready(run: Any, samples: Any) -> None:
    """Called with the generated samples (a tensor in data space) before they are written."""


@hookspec
def dkit_run_finished(run: Any, metrics: dict[str, float]) -> None:
    """Called at the end of a run with the evaluated metrics."""

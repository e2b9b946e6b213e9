"""The plugin contract of diffusers_kit: every pluggy hook, documented in one place.

A plugin is a module (or object) with functions decorated by :data:`diffusers_kit.hookimpl`
whose names match the hooks below. Third-party distributions announce their plugin module in
the ``diffusers_kit`` entry-point group::

    [project.entry-points.diffusers_kit]
    my_plugin = "my_package.plugin"

The built-in components are registered by :mod:`diffusers_kit.builtin` through exactly the
same ``dkit_register`` hook; nothing is special-cased.

**Versions.** :data:`PLUGIN_API_VERSION` is the version of this contract (the hooks, their
arguments, the registry's methods and the :class:`~diffusers_kit.run.Run` attributes listed
below). A minor version adds to it; a major version changes or removes something. A plugin
module states what it was written for with a module-level version specifier, checked when it
loads (an incompatible plugin is reported by name and skipped; ``dkit plugins`` shows both)::

    DKIT_PLUGIN_API = ">=1.0,<2"

**Names are checked.** A function decorated with ``@hookimpl`` whose name is not a hook below
(``dkit_run_finish`` for ``dkit_run_finished``) is an error: the plugin is reported with the
hook's name and the closest real one, and not loaded (pluggy's ``check_pending``). Mark an
implementation of a hook that only a newer dkit has ``@hookimpl(optionalhook=True)``.

**The run.** The life-cycle hooks receive ``run``, a :class:`diffusers_kit.run.Run`. A plugin
may rely on these attributes (part of the plugin API; anything else on it may change):

- ``run.spec`` — the validated spec (:class:`diffusers_kit.spec.models.Spec`): ``run.spec.name``,
  ``run.spec.seed``, ``run.spec.train.steps``, ...;
- ``run.dir`` — the run folder (a :class:`pathlib.Path`; ``None`` on data-parallel ranks other
  than 0, which write nothing), where ``checkpoint.safetensors``, ``samples.png``,
  ``metrics.json`` and the log are written; a plugin may add its own files there;
- ``run.results`` — what the stages produced so far, a :class:`~diffusers_kit.run.Results`:
  ``run.results.samples`` (a tensor), ``.nfe``, ``.metrics``, ``.train_loss``, ``.train_hash``
  (None until produced); it also reads as the dict of 0.2 (``run.results["metrics"]``,
  ``"samples" in run.results``);
- ``run.components.diffusion`` (also ``run.diffusion``) — the
  :class:`~diffusers_kit.diffusion.Diffusion` being trained / sampled (its ``process``, ``network``,
  ``objective``, ``device``, ``step``); ``run.components.data`` — the
  :class:`~diffusers_kit.data.base.DataSplits`; ``run.components.solver``;
- ``run.log`` — the run's :class:`logging.Logger` (its lines go to the run folder's log);
- ``run.quiet`` — True when the user asked for no console output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from diffusers_kit.registry import Registry
    from diffusers_kit.run import Run

PROJECT = "diffusers_kit"

#: The version of the plugin contract this dkit provides (``dkit plugins`` shows it). A plugin
#: requires one with a module-level ``DKIT_PLUGIN_API = ">=1.0,<2"`` (see the module doc).
PLUGIN_API_VERSION = "1.1"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class OptionError(ValueError):
    """A component constructor's refusal of one of its own options: ``option`` (a parameter
    name) should be ``expected`` (what would do, in words) and is ``given``. Its text is
    ``"<option>: expected <expected>, given <given>"``; in a spec the error is reported on that
    option's field and YAML line rather than on the component's whole mapping (any other
    ``ValueError`` / ``TypeError`` a constructor raises is). Part of the plugin contract (API
    1.1): a plugin's constructor may raise it too."""

    def __init__(self, option: str, expected: str, given: object) -> None:
        super().__init__(f"{option}: expected {expected}, given {given!r}")
        self.option, self.expected, self.given = option, expected, given


@hookspec
def dkit_register(registry: Registry) -> None:
    """Add component kinds and components to ``registry``.

    Call ``registry.add_kind(name, base_class, doc)`` to declare a new kind of component and
    ``registry.add(kind, name, factory)`` to register a component. The factory's constructor
    signature (type hints plus ``Annotated[..., Field(...)]`` constraints) is its spec schema.
    ``dkit plugins`` lists the kinds (``data``, ``process``, ``network``, ``solver``, ...);
    ``dataset``, the old name of ``data``, still works with a DeprecationWarning.
    """


@hookspec
def dkit_run_started(run: Run) -> None:
    """Called once the run folder exists and the components are built, before the first stage.

    ``run`` is a :class:`~diffusers_kit.run.Run`; the module doc lists what a plugin may rely
    on (``run.spec``, ``run.dir``, ``run.results``, ``run.components.diffusion``, ``run.log``).
    """


@hookspec
def dkit_train_step(run: Run, step: int, loss: float) -> None:
    """Called every ``train.log_every`` steps with the mean loss since the last call.

    ``step`` counts optimizer steps from 1; ``loss`` is a host float (the engine synchronises
    only at these logging points). ``run.components.diffusion`` is the model being trained.
    """


@hookspec
def dkit_samples_ready(run: Run, samples: torch.Tensor) -> None:
    """Called with the generated samples before they are written.

    ``samples`` is a float32 CPU tensor ``(n, *data_shape)`` in model space (the data set's
    ``to_display`` maps it to display space); ``run.dir`` is where they will be written.
    """


@hookspec
def dkit_run_finished(run: Run, metrics: dict[str, float]) -> None:
    """Called at the end of a run with the evaluated metrics (``{}`` when nothing was
    evaluated); ``run.results`` holds everything the stages produced, ``run.dir`` the files."""

"""The tracker interface the built-in plugin's life-cycle hooks call."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def missing_extra(module: str, kind: str, extra: str) -> None:
    """Raise a ValueError (a spec error naming the ``track`` entry, exit status 2) when
    ``module`` cannot be imported, saying which optional extra of dkit installs it."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"tracker {kind!r} needs the {module} package, which is not "
                         f"installed: install the optional '{extra}' extra: pip install "
                         f"diffusers_kit[{extra}]")


class Tracker:
    """Receives one run's events; every method does nothing unless overridden.

    The constructor only checks its arguments and that its package is installed (it runs when
    the spec is checked, before any training); :meth:`start` opens the writer or the tracking
    run. ``run`` is the :class:`~diffusers_kit.run.Run` the hooks receive (its documented
    attributes: ``spec``, ``dir``, ``results``, ``components``, ``log``); trackers are called on
    the process that writes the run folder only (rank 0).
    """

    def start(self, run: Any) -> None:
        """The run folder exists and the components are built."""

    def train_step(self, run: Any, step: int, values: dict[str, float]) -> None:
        """Training figures at optimizer step ``step``: ``loss`` (the mean since the last
        call) and ``learning_rate``."""

    def samples(self, run: Any, samples: torch.Tensor, step: int) -> None:
        """The run's samples (float32, CPU, model space) after ``step`` training steps."""

    def finish(self, run: Any, metrics: dict[str, float], step: int) -> None:
        """The run ended: its metrics (each beside its ``<name>_floor``), its folder complete."""

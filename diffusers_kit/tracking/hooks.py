"""The built-in plugin's life-cycle hooks that feed a run's trackers (``spec.track``, built
with the run's components: ``run.components.trackers``). Only the process that writes the run
folder tracks (``run.dir`` is None on other data-parallel ranks)."""

from __future__ import annotations

from typing import Any

from diffusers_kit.hookspecs import hookimpl


def _trackers(run: Any) -> list[Any]:
    if run.dir is None:
        return []
    return list(getattr(run.components, "trackers", None) or [])


def _step(run: Any) -> int:
    return int(getattr(run.components.diffusion, "step", 0) or 0)


@hookimpl
def dkit_run_started(run: Any) -> None:
    for tracker in _trackers(run):
        tracker.start(run)


@hookimpl
def dkit_train_step(run: Any, step: int, loss: float) -> None:
    trackers = _trackers(run)
    if not trackers:
        return
    values = {"loss": float(loss)}
    trainer = getattr(run.components.diffusion, "trainer", None)
    optim = getattr(trainer, "optim", None)
    if optim is not None and optim.param_groups:
        values["learning_rate"] = float(optim.param_groups[0]["lr"])
    for tracker in trackers:
        tracker.train_step(run, step, values)


@hookimpl
def dkit_samples_ready(run: Any, samples: Any) -> None:
    for tracker in _trackers(run):
        tracker.samples(run, samples, _step(run))


@hookimpl
def dkit_run_finished(run: Any, metrics: dict[str, float]) -> None:
    for tracker in _trackers(run):
        tracker.finish(run, metrics, _step(run))

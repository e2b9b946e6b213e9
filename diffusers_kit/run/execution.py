"""Executing a spec: its referenced models built (or reused) first, its components built and
checked, its run folder created, the chosen stages run, the run record kept up to date.

A finished run under the output root with the spec's training hash is reused (its checkpoint
linked, the train stage skipped) unless ``rebuild``; a referenced spec is built the same way, in
its own run folder, under one lock per training hash so that two concurrent runs build it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from diffusers_kit.checkpoint import CheckpointError, load_metadata
from diffusers_kit.console import make_console
from diffusers_kit.diffusion import (
    resolve_device,
)
from diffusers_kit.outputs import checked_root, make_run_dir
from diffusers_kit.references import TrainedModel
from diffusers_kit.registry import (
    Registry,
    get_plugin_manager,
    get_registry,
)
from diffusers_kit.run.build import build_components
from diffusers_kit.run.resume import check_resumable, link_checkpoint, load_previous
from diffusers_kit.run.stages import GRAPH, STAGES, Run, scalar_metrics, stage_train
from diffusers_kit.run_folder import (
    CHECKPOINT,
    alive_marker,
    build_lock,
    find_finished,
    newest_run,
    now,
    point_latest,
    read_record,
    unique_folder,
    write_record,
    write_spec,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue, dotted
from diffusers_kit.spec.loader import Document
from diffusers_kit.spec.models import Spec
from diffusers_kit.spec.references import (
    references,
    spec_hash,
)
from diffusers_kit.train import (
    Distributed,
    TrainingInterrupted,
    distributed_from_env,
    leave_distributed,
)


def _new_run_dir(root: Path, name: str) -> Path:
    return make_run_dir(root, name)  # race-free, contained (diffusers_kit/outputs.py)


def parse_only(only: str | None) -> set[str]:
    """``"sample,evaluate"`` -> the stage set (data and report always run)."""
    if not only:
        return set(STAGES)
    import difflib

    chosen = {s.strip() for s in only.split(",") if s.strip()}
    unknown = chosen - set(STAGES)
    if unknown:
        close = [match for name in sorted(unknown)
                 for match in difflib.get_close_matches(name, STAGES, 1)]
        raise SpecError([SpecIssue(("--only",), f"stage names from {', '.join(STAGES)}",
                                   ",".join(sorted(unknown)), None, "command line",
                                   list(dict.fromkeys(close)))])
    return chosen | {"data", "report"}


def execute(
    spec: Spec,
    document: Document | None = None,
    *,
    only: str | None = None,
    from_dir: str | Path | None = None,
    resume: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
    root: str | Path | None = None,
    rebuild: bool = False,
    dependency: bool = False,
    allow_change: tuple[str, ...] = (),
) -> Run:
    """Validate-and-build, create the run folder, run the chosen stages; returns the Run.

    Models the spec refers to are built first (or reused: :mod:`diffusers_kit.pipeline`). When a
    finished run under the output root has this spec's training hash, its checkpoint is reused
    and the train stage skipped, unless ``rebuild``. ``resume``: continue the killed or finished
    run in that folder (its checkpoint and spec). ``root`` replaces ``output.root`` (a
    dependency is built under its dependent's root). Under ``torchrun`` every rank trains; only
    rank 0 creates the folder, writes, samples.
    """
    stages = parse_only(only)
    if spec.sample is None:
        stages.discard("sample")  # a spec that only trains (a classifier, a feature network)
    if spec.restore is None:
        stages.discard("restore")
    from_path = Path(from_dir) if from_dir else None
    resume_path = Path(resume) if resume else None
    trained = spec.model if isinstance(spec.model, TrainedModel) else None
    if trained is not None:
        for option, value in (("--resume", resume_path), ("--from", from_path)):
            if value is not None:
                raise SpecError([SpecIssue((option,), "no such option for a spec whose 'model' "
                                           "names the trained model", str(value), None,
                                           "command line")])
        stages.discard("train")
    if allow_change and resume_path is None:  # --from never refuses a changed spec
        raise SpecError([SpecIssue(("--allow-change",), "--resume RUN_DIR as well: it only lets "
                                   "a resumed run's spec differ from that run's (--from takes "
                                   "the weights whatever changed, and lists the differences)",
                                   " ".join(allow_change), None, "command line")])
    if resume_path is not None and ("train" not in stages or from_path is not None):
        raise SpecError([SpecIssue(("--resume",), "the train stage, without --from (a resumed "
                                   "run continues training)", str(resume_path), None,
                                   "command line")])
    if trained is None and "train" not in stages and stages & {"sample", "restore"}:
        if from_path is None:
            raise SpecError([SpecIssue(("--from",), "a run folder to take the checkpoint from "
                                       "when the train stage is skipped", None, None,
                                       "command line")])
        if not (from_path / CHECKPOINT).is_file():
            where = ("" if from_path.is_absolute()
                     else f" (relative to the working directory {Path.cwd()})")
            raise SpecError([SpecIssue(("--from",), f"a run folder holding {CHECKPOINT}{where}",
                                       str(from_path), None, "command line",
                                       newest_run(from_path))])
    console = console or make_console(stderr=True)
    root_path = Path(root) if root is not None else Path(spec.output.root)
    root_path = checked_root(root_path, spec.name, document, resume_path)  # before any mkdir
    registry = get_registry()
    # a dependency is built by one process (rank 0 of a distributed run, see
    # build_references_once), never by a data-parallel group
    distributed = (Distributed() if dependency
                   else distributed_from_env(resolve_device(spec.device).type))
    settings = BuildSettings(root_path, rebuild, console, quiet)
    # what the run would refuse is refused before any training, a dependency's included: when
    # a referenced model must be trained first, the spec is checked with untrained stand-ins
    # before that (else once, with the models themselves)
    unbuilt = any(model.run_dir is None and model.hash is not None and (
        rebuild or find_finished(root_path, model.hash) is None)
        for _, model in references(spec, registry))
    if unbuilt:
        build_components(spec, document, registry, distributed=distributed, stages=stages,
                         check_metrics=True)
    # each in its own run folder, before this one; under torchrun by rank 0 while the others wait
    build_references_once(spec, registry, settings, distributed)
    components = build_components(spec, document, registry, distributed=distributed,
                                  stages=stages, check_metrics=not unbuilt)
    components.resolved["output"]["root"] = str(root_path)
    digest = spec_hash(spec, components.resolved)  # its defaults, filled once by the build
    resume_step = 0
    if resume_path is not None:
        resume_step = check_resumable(resume_path, components.resolved, distributed.world,
                                      allow_change, components.diffusion)
    if from_path is not None:  # before any folder is created; with train: a warm start
        load_previous(components.diffusion, from_path, resolved=components.resolved, note=console)
    if not distributed.main:  # a data-parallel helper: train, write nothing
        run = Run(spec, components, None, console, True, None,
                  resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
        stage_train(run)
        leave_distributed(distributed)
        return run
    trains = "train" in stages
    # concurrent runs that would train the same model wait for one another, then reuse
    lock = (build_lock(root_path, digest, console, spec.name)
            if trains and not distributed.active and not dependency
            else contextlib.nullcontext())  # a dependency's builder already holds it
    with lock:
        reused = None
        if trains and resume_path is None and from_path is None and not rebuild and (
                not distributed.active):
            reused = find_finished(root_path, digest)
        if reused is not None:
            load_previous(components.diffusion, reused, "train")
            stages.discard("train")
        # --resume continues an interrupted run in its folder; a finished run is never
        # changed: extending or re-evaluating it writes a new run folder beside it that
        # records where it came from
        previous = read_record(resume_path) if resume_path is not None else None
        extends = previous is not None and previous.get("status") == "finished"
        if resume_path is None:
            run_dir = _new_run_dir(root_path, spec.name)
        elif extends:
            run_dir = unique_folder(resume_path.parent, time.strftime("%Y%m%d-%H%M%S"))
        else:
            run_dir = resume_path
        checkpoint_from = reused or (trained.run_dir if trained is not None else None)
        if extends:  # the new folder starts with the weights it continues (replaced, not
            # written through, when training saves: the finished run's file never changes)
            link_checkpoint(resume_path / CHECKPOINT, run_dir)
        if checkpoint_from is not None:
            link_checkpoint(checkpoint_from / CHECKPOINT, run_dir)
        elif from_path is not None and "train" not in stages:
            # sampled or evaluated with --from's weights: recorded (so the run says which
            # training it shows), not linked (the folder holds what this run made)
            checkpoint_from = from_path
        run = Run(spec, components, run_dir, console, quiet, from_path,
                  resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
        run.results.train_hash = digest
        run.results.dependencies = [d.as_dict() for d in settings.dependencies]
        if checkpoint_from is not None:
            run.results.checkpoint_from = str(checkpoint_from)
        record = dict(previous) if resume_path is not None and previous else None
        if extends:
            record = {key: value for key, value in (record or {}).items()
                      if key not in ("metrics", "step", "latent_scale")}
            record["resumed_from"] = str(resume_path.absolute())  # not the cwd's
        record = {**(record or {}), "name": spec.name, "status": "running",
                  "train_hash": digest, "started": now(), "finished": None, "train_finished": None,
                  "trained": "train" in stages or bool(record and record.get("trained")),
                  "checkpoint_from": str(checkpoint_from) if checkpoint_from else None,
                  "dependency": dependency, "stages": sorted(stages),
                  "dependencies": run.results.dependencies}
        with alive_marker(run_dir):
            write_record(run_dir, record)
            try:
                _run_stages(run, stages, reused, trained,
                            after_train=lambda: _training_finished(run_dir, record))
            except (TrainingInterrupted, KeyboardInterrupt) as exc:
                stopped = _interrupted_with_checkpoint(exc, run_dir)
                step = stopped.step if stopped is not None else components.diffusion.step
                record.update(status="interrupted", step=step)
                _write_if_there(run_dir, record)
                if stopped is not None:
                    raise stopped from exc
                raise
            except BaseException:
                record.update(status="failed", step=components.diffusion.step)
                _write_if_there(run_dir, record)
                if record.get("train_finished"):
                    _say_training_kept(console, run_dir, document, stages)
                raise
            record.update(status="finished", finished=now(), step=components.diffusion.step,
                          metrics=scalar_metrics(run.results.metrics or {}))
            write_record(run_dir, record)
        point_latest(run_dir)
    return run


def _interrupted_with_checkpoint(exc: BaseException, run_dir: Path
                                 ) -> TrainingInterrupted | None:
    """Ctrl-C or SIGTERM outside the training loop (while the checkpoint of a resumed run is
    loaded, or while sampling or evaluating) in a folder that holds a checkpoint: a
    :class:`TrainingInterrupted` at the checkpoint's step, so the message gives the resume
    command as it does during training (before: 'terminated (SIGTERM)' alone, and the record's
    step 0 for a new folder extending a finished run). None when ``exc`` already is one, or
    there is no readable checkpoint to continue from."""
    if isinstance(exc, TrainingInterrupted) or not (run_dir / CHECKPOINT).is_file():
        return None
    try:
        step = int(load_metadata(run_dir / CHECKPOINT)["training"]["train_step"])
    except (CheckpointError, KeyError, TypeError, ValueError, OSError):
        return None
    stopped = TrainingInterrupted(step, saved=True)
    stopped.run_dir = run_dir
    return stopped


def _write_if_there(run_dir: Path, record: dict[str, Any]) -> None:
    """The record of a stopped run, unless its folder is gone (never recreated for it)."""
    if run_dir.is_dir():
        write_record(run_dir, record)


def _training_finished(run_dir: Path, record: dict[str, Any]) -> None:
    """Record that the train stage finished (its final checkpoint written): the checkpoint is
    reusable by content hash even if a later stage fails (:func:`find_finished`)."""
    record["train_finished"] = now()
    write_record(run_dir, record)


def _say_training_kept(console: Console, run_dir: Path, document: Document | None,
                       stages: set[str]) -> None:
    """After a stage past training failed: the training is not lost, and how to go on."""
    source = document.origin if document is not None else "SPEC"
    overrides = " ".join(shlex.quote(text)
                         for text in dict.fromkeys(document.overridden.values())
                         ) if document is not None else ""
    after = ",".join(s for s in ("sample", "restore", "evaluate") if s in stages)
    command = " ".join(part for part in ("dkit run", shlex.quote(source), overrides) if part)
    message = (f"the training finished before the failure: its checkpoint in {run_dir} is "
               f"kept, and `{command}` reuses it (same training hash) instead of training "
               "again")
    if after:
        message += (f"; to run only the stages after training: `{command} --only {after} "
                    f"--from {shlex.quote(str(run_dir))}`")
    console.print(f"note: {message}", soft_wrap=True, markup=False, highlight=False)


def _run_stages(run: Run, stages: set[str], reused: Path | None,
                trained: TrainedModel | None,
                after_train: Callable[[], None] | None = None) -> None:
    spec, components, run_dir = run.spec, run.components, run.dir
    assert run_dir is not None
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    run.log.setLevel(logging.INFO)
    run.log.propagate = False
    run.log.addHandler(handler)
    try:
        write_spec(run_dir, components.resolved)
        network = components.diffusion.network
        run.log.info("run %s on %s; network %s with %d parameters", spec.name,
                     components.diffusion.device, type(network).__name__,
                     network.parameter_count())
        run.log.info("training hash %s", run.results.train_hash)
        for dep in run.results.dependencies or []:
            how = "reused" if dep["reused"] else "built" if dep["reused"] is False else "given"
            run.log.info("%s: model %s (%s, hash %s)", dep["field"], dep["run"], how,
                         dep["hash"][:12])
        if run.distributed.active:
            run.log.info("data parallel over %d ranks", run.distributed.world)
        if not run.quiet:
            run.console.print(f"network: {network.describe()}")
        if reused is not None:
            message = (f"train stage skipped: a finished run with the same training hash "
                       f"exists, reusing its checkpoint {reused / CHECKPOINT} (step "
                       f"{components.diffusion.step}; --rebuild trains again)")
            run.log.info(message)
            if not run.quiet:
                run.console.print(message, soft_wrap=True)
        if trained is not None:
            run.log.info("model %s (step %d)", trained.run_dir, components.diffusion.step)
        if run.from_dir is not None and "train" not in stages:
            run.log.info("weights loaded from %s (step %d)", run.from_dir / CHECKPOINT,
                         components.diffusion.step)
        get_plugin_manager().hook.dkit_run_started(run=run)
        for stage in GRAPH:
            if stage.name not in stages:
                continue
            started = time.perf_counter()
            stage.run(run)
            run.timings[stage.name] = time.perf_counter() - started
            if stage.name == "train" and after_train is not None:
                after_train()
        get_plugin_manager().hook.dkit_run_finished(run=run,
                                                     metrics=run.results.metrics or {})
        leave_distributed(run.distributed)
    finally:
        run.log.removeHandler(handler)
        handler.close()


@dataclass
class Dependency:
    """One model a run used: where the spec named it, what it referenced, which run, its hash."""

    field: str
    reference: str | dict[str, Any]
    run: str
    hash: str
    reused: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "reference": self.reference, "run": self.run,
                "hash": self.hash, "reused": self.reused}


@dataclass
class BuildSettings:
    """How references are built: the output root, ``--rebuild``, where progress goes."""

    root: Path
    rebuild: bool = False
    console: Console | None = None
    quiet: bool = False
    dependencies: list[Dependency] = field(default_factory=list)
    build: bool = True  # False: only reuse (a rank waiting for rank 0's builds)


def build_reference(model: TrainedModel, *, root: Path, rebuild: bool = False,
                    console: Console | None = None, quiet: bool = False,
                    build: bool = True) -> Path:
    """Make sure the model ``model`` refers to exists as a finished run; returns its folder.

    A run-folder reference is used as it is. A spec reference reuses the newest finished run
    with its hash under ``root`` (unless ``rebuild``), else runs the spec's train stage there.
    ``build=False``: reuse only (the newest finished run, whatever ``rebuild``), an error if
    there is none.
    """
    if model.run_dir is not None:  # a run folder (or one recorded when the reference was built)
        return model.run_dir
    assert model.spec is not None and model.hash is not None and model.document is not None
    what = f"{model.spec.name} ({model.hash[:12]})"
    if not build:  # rank 0 built or found it; the same finished run is reused, unlocked
        found = find_finished(root, model.hash)
        if found is None:
            raise RuntimeError(
                f"rank {os.environ.get('RANK', '?')} does not see the run of {what} that rank 0 "
                f"built under {root}: under torchrun on several nodes the output root must be "
                f"on a filesystem every node sees (as for --resume)")
        model.run_dir, model.reused = found, True
        return found
    with build_lock(root, model.hash, console, what):
        found = None if rebuild else find_finished(root, model.hash)
        if found is not None:
            model.run_dir, model.reused = found, True
            if console is not None and not quiet:
                console.print(f"reusing [bold]{what}[/]: {found}", soft_wrap=True)
            return found
        if console is not None and not quiet:
            console.print(f"building [bold]{what}[/] from {model.source}", soft_wrap=True)
        run = execute(model.spec, model.document, only="train", console=console, quiet=quiet,
                      root=root, rebuild=rebuild, dependency=True)
        assert run.dir is not None
        model.run_dir, model.reused = run.dir, False
        return run.dir


def build_references(spec: Spec, registry: Registry, settings: BuildSettings) -> None:
    """Build (or reuse) every model ``spec`` refers to, depth first; records the dependencies."""
    done: dict[str, tuple[Path, bool | None]] = {}  # one build (and one message) per model
    for path, model in references(spec, registry):
        if model.run_dir is None and model.hash in done:
            model.run_dir, model.reused = done[model.hash]
        else:
            build_reference(model, root=settings.root, rebuild=settings.rebuild,
                            console=settings.console, quiet=settings.quiet,
                            build=settings.build)
        assert model.run_dir is not None and model.hash is not None
        done[model.hash] = (model.run_dir, model.reused)
        settings.dependencies.append(Dependency(dotted(path), model.ref.to_config(),
                                                str(model.run_dir), model.hash, model.reused))


def build_references_once(spec: Spec, registry: Registry, settings: BuildSettings,
                          distributed: Distributed) -> None:
    """:func:`build_references`, once per data-parallel job: rank 0 builds (or reuses) every
    model ``spec`` refers to, each trained by rank 0 alone, while the other ranks wait; then
    they take the finished runs rank 0 built (with ``--rebuild`` too: rank 0 has rebuilt).

    The others wait on the rendezvous store, not in a collective, so a build may take longer
    than the process group's timeout; rank 0 posts ``built`` or why it failed, and a waiting
    rank whose store goes away (rank 0's node died) fails with the store's error.
    """
    if not distributed.active:
        build_references(spec, registry, settings)
        return
    if not any(model.run_dir is None for _, model in references(spec, registry)):
        build_references(spec, registry, settings)  # run folders: nothing to build
        return
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    key = "dkit_references_built"
    if distributed.main:
        try:
            build_references(spec, registry, settings)
        except BaseException as exc:
            store.set(key, f"failed: {type(exc).__name__}: {exc}"[:2000])
            raise
        store.set(key, "built")
        return
    while not store.check([key]):
        time.sleep(0.2)
    status = store.get(key).decode()
    if status != "built":
        raise RuntimeError(f"rank 0 could not build the models this spec refers to ({status})")
    settings.build = False
    build_references(spec, registry, settings)

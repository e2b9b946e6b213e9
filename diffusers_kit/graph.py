"""The run graph: data -> train -> sample -> evaluate -> report, built from a validated spec.

Every component is built (and every spec problem reported) before the run folder is created, so
a broken spec never leaves a half-written folder behind. Each stage declares what it needs and
what it produces; ``only`` selects stages and ``from_dir`` supplies a previous run's checkpoint,
so a trained model can be sampled again without retraining.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from diffusers_kit.api import (
    Diffusion,
    PluginOutputError,
    batch_count,
    resolve_device,
)
from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.checkpoint import CheckpointError, load_checkpoint, remove_orphans, unprefixed
from diffusers_kit.console import make_console
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.guidance.base import Guidance, LabelsError, requested_labels
from diffusers_kit.metrics.base import Metric, metric_figures
from diffusers_kit.metrics.floor import summarize
from diffusers_kit.metrics.range import out_of_range
from diffusers_kit.metrics.reconstruction import reconstructions
from diffusers_kit.outputs import checked_root, make_run_dir
from diffusers_kit.references import LoadedModel, ModelReferenceError, TrainedModel, install_store
from diffusers_kit.registry import (
    NestedBuildError,
    Registry,
    get_plugin_manager,
    get_registry,
)
from diffusers_kit.report import columns_per_class, image_grid, labelled_grid, scatter_plot
from diffusers_kit.restore import restoration_images, restore, write_restoration
from diffusers_kit.run_folder import (
    CHECKPOINT,
    SPEC_FILE,
    alive_marker,
    build_lock,
    find_finished,
    follow_latest,
    now,
    point_latest,
    read_record,
    write_record,
)
from diffusers_kit.solvers.base import Solver
from diffusers_kit.spec.errors import Path as SpecPath
from diffusers_kit.spec.errors import SpecError, SpecIssue, dotted
from diffusers_kit.spec.loader import Document, apply_overrides, component_option, load_file
from diffusers_kit.spec.models import Spec
from diffusers_kit.spec.references import (
    TRAINING_SECTIONS,
    PlanFailed,
    plan_reference,
    references,
    resolve_spec,
    spec_hash,
)
from diffusers_kit.spec.validate import validate
from diffusers_kit.train import (
    Distributed,
    TrainingDiverged,
    TrainingInterrupted,
    distributed_from_env,
    leave_distributed,
)

STAGES = ("data", "train", "sample", "restore", "evaluate", "report")


@dataclass
class Stage:
    name: str
    needs: tuple[str, ...]
    produces: tuple[str, ...]
    run: Callable[[Run], None]


@dataclass
class Components:
    dataset: Dataset
    data: DataSplits
    diffusion: Diffusion
    solver: Solver | None
    metrics: list[tuple[str, Metric]]
    optimizer: Any
    resolved: dict[str, Any]
    guidance: list[Guidance] = field(default_factory=list)
    labels: torch.Tensor | None = None  # one requested class per sample (sample.labels)
    restore_method: Guidance | None = None  # restore.method, its forward model inside
    restore_solver: Solver | None = None


class Builder:
    """Builds components from spec sections, turning construction errors into spec issues."""

    def __init__(self, registry: Registry, document: Document | None) -> None:
        self.registry = registry
        self.document = document
        self.issues: list[SpecIssue] = []

    def issue(self, path: SpecPath, expected: str, given: Any) -> None:
        line, origin = self.document.locate(path) if self.document else (None, None)
        self.issues.append(SpecIssue(path, expected, given, line, origin))

    def build(self, path: SpecPath, kind: str, config: dict[str, Any], **context: Any) -> Any:
        try:
            return self.registry.build(kind, config, **context)
        except NestedBuildError as exc:  # name the nested component that failed, not its parent
            name = exc.config.get("kind") if isinstance(exc.config, dict) else None
            self.issue(path + exc.path, f"parameters that {name!r} accepts: {exc.error}",
                       exc.config)
            return None
        except (ValueError, TypeError) as exc:
            self.issue(path, f"parameters that {config.get('kind')!r} accepts: {exc}", config)
            return None

    def resolve(self, kind: str, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with every default filled in (:meth:`Registry.resolve`)."""
        return self.registry.resolve(kind, config)


def build_components(
    spec: Spec,
    document: Document | None = None,
    registry: Registry | None = None,
    distributed: Distributed | None = None,
    stages: set[str] | None = None,
    check_metrics: bool = False,
) -> Components:
    """Build every component of ``spec`` (loading the data for the network's shape).

    When ``spec.model`` names a trained model, the data set, process, network, objective and
    optimizer are those of the model's own run, and its checkpoint is loaded. With
    ``check_metrics`` every metric is also tried on stand-in samples of the run's sizes
    (:func:`check_metric_sizes`), so that one that cannot apply is refused now.
    """
    registry = registry or get_registry()
    builder = Builder(registry, document)
    device = resolve_device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        builder.issue(("device",), "a device this machine has (no CUDA here; use auto or cpu)",
                      spec.device)
    elif device.type == "cuda" and distributed is not None and distributed.active:
        device = torch.device("cuda", distributed.local_rank)  # one GPU per rank
    trained = spec.model if isinstance(spec.model, TrainedModel) else None
    source = spec if trained is None else trained.spec
    assert source is not None, "the model reference was planned by validate()"
    if source.train.precision == "fp16" and device.type != "cuda":
        builder.issue(("train", "precision"), "fp32 or bf16 on this device (fp16 with a "
                      "gradient scaler needs CUDA)", source.train.precision)
    # a trained model's own sections were validated with its own spec; errors point there
    model_builder = builder if trained is None else Builder(registry, trained.document)
    dataset = model_builder.build(("data",), "data", source.data)
    process = (model_builder.build(("process",), "process", source.process)
               if source.process is not None else None)  # an autoencoder spec has none
    objective_config = source.objective
    if objective_config is None and source.autoencoder is not None:
        objective_config = {"kind": "reconstruction"}
    objective = model_builder.build(("objective",), "objective", objective_config)
    optimizer = model_builder.build(("train", "optimizer"), "optimizer", source.train.optimizer)
    solver = None
    if spec.sample is not None:
        solver = builder.build(("sample", "solver"), "solver", spec.sample.solver)
    if solver is not None and process is not None and (reason := solver.check(process)):
        builder.issue(("sample", "solver", "kind"), reason, spec.sample.solver["kind"])
    data = None
    if dataset is not None:
        try:
            data = dataset.load()
        except (OSError, ValueError) as exc:
            model_builder.issue(("data",), f"a data set that loads ({exc})", source.data)
    shape = {} if data is None else {"data_shape": data.shape}  # for nested operators
    metrics = [(m["kind"], builder.build(("evaluate", "metrics", i), "metric", m, **shape))
               for i, m in enumerate(spec.evaluate.metrics)]
    network, autoencoder = None, None
    if data is not None and source.latent is not None:
        autoencoder = _first_stage(source.latent, data.shape, model_builder)
    if data is not None and source.autoencoder is not None:
        torch.manual_seed(source.seed)  # the network's initial weights follow the spec's seed
        network = model_builder.build(("autoencoder",), "autoencoder", source.autoencoder,
                                      data_shape=data.shape)
        if objective is not None and not objective.first_stage:
            model_builder.issue(("objective", "kind"), "an objective that trains an "
                                "autoencoder (reconstruction), or no objective section",
                                objective_config["kind"])
    elif data is not None and (source.latent is None or autoencoder is not None):
        torch.manual_seed(source.seed)  # the network's initial weights follow the spec's seed
        shape = data.shape if autoencoder is None else tuple(autoencoder.latent_shape)
        network = model_builder.build(("network",), "network", source.network,
                                      data_shape=shape)
        if objective is not None and objective.first_stage:
            model_builder.issue(("objective", "kind"), "an objective that trains a diffusion "
                                "model (reconstruction trains a spec's 'autoencoder')",
                                objective_config["kind"])
    if network is not None and objective is not None and process is not None:
        if reason := objective.check(process, network):
            model_builder.issue(("objective", "kind"), reason, source.objective["kind"])
        if network.num_classes is not None and data is not None and (
                data.train_labels is None):
            model_builder.issue(("network", "num_classes"), "a data set with class labels "
                                "(this one has none); leave num_classes out",
                                network.num_classes)
        if source.train.compile and objective.differentiates_twice:
            model_builder.issue(("train", "compile"), f"false with objective "
                                f"{source.objective['kind']!r} (it differentiates twice, which "
                                "compiled graphs cannot)", True)
        if objective.needs_labels and data is not None and data.train_labels is None:
            model_builder.issue(("data", "kind"), f"a data set with class labels for objective "
                                f"{source.objective['kind']!r}", source.data["kind"])
    if network is not None and network.prediction in ("logits", "reconstruction") and (
            spec.sample is not None and (stages is None or "sample" in stages)):
        what = "a classifier" if network.prediction == "logits" else "an autoencoder"
        builder.issue(("sample",) if trained is None else ("model",),
                      f"no sample section: {what} is not a model to sample from "
                      "(leave 'sample' out, or run with --only train)",
                      spec.sample.solver["kind"])
    issues = builder.issues + (model_builder.issues if model_builder is not builder else [])
    if issues:
        raise SpecError(issues, document.origin if document else None)
    resolved = resolve_spec(spec, registry)
    resolved["model"] = trained.to_config() if trained is not None else None
    if trained is not None:  # the model's own sections live in its run's spec.yaml
        for section in ("data", "autoencoder", "latent", "process", "network", "objective",
                        "train"):
            resolved.pop(section, None)
    diffusion = Diffusion(process, network, objective, device=device, autoencoder=autoencoder)
    if trained is not None and trained.run_dir is not None:
        load_previous(diffusion, trained.run_dir, "model")
    guidance, labels = _conditioning(spec, builder, diffusion, data, stages)
    method, restore_solver = _restoration(spec, builder, diffusion, data, solver, stages)
    if check_metrics and data is not None and spec.sample is not None and (
            stages is None or {"sample", "evaluate"} <= stages):
        check_metric_sizes(spec, builder, diffusion, data, labels)
        if builder.issues:
            raise SpecError(builder.issues, document.origin if document else None)
    return Components(dataset, data, diffusion, solver, metrics, optimizer, resolved, guidance,
                      labels, method, restore_solver)


def _first_stage(reference: TrainedModel, data_shape: tuple[int, ...], builder: Builder
                 ) -> Autoencoder | None:
    """The trained autoencoder ``latent`` names (its sampling weights, frozen), checked against
    the images of this spec's data set; None (with the issue recorded) when it does not fit.

    A reference not built yet (``dkit validate --build``, a spec built without running its
    dependencies) gives the autoencoder its spec describes, untrained: enough to check shapes
    and build the network; a run always builds its references first."""
    try:
        if not reference.resolved and reference.spec is not None and (
                reference.spec.autoencoder is not None):
            network = builder.registry.build("autoencoder", reference.spec.autoencoder,
                                             data_shape=tuple(data_shape))
        else:
            network = reference.network()
    except (OSError, ValueError) as exc:
        builder.issue(("latent",), f"a trained autoencoder that loads ({exc})",
                      reference.ref.describe())
        return None
    if not isinstance(network, Autoencoder):
        builder.issue(("latent",), "a trained autoencoder (a run of a spec with an "
                      f"'autoencoder' section); this one trained a {type(network).__name__}",
                      reference.ref.describe())
        return None
    if tuple(network.data_shape) != tuple(data_shape):
        builder.issue(("latent",), f"an autoencoder of images of shape {tuple(data_shape)} "
                      f"(this data set's); it was trained on {tuple(network.data_shape)}",
                      reference.ref.describe())
        return None
    return network


def _restoration(spec: Spec, builder: Builder, diffusion: Diffusion, data: DataSplits | None,
                 solver: Solver | None, stages: set[str] | None
                 ) -> tuple[Guidance | None, Solver | None]:
    """``restore.method`` (a measurement term, its operator built for the data's shape) and
    the solver it samples with, checked against the model."""
    section = spec.restore
    if section is None or (stages is not None and "restore" not in stages) or data is None:
        return None, None
    method = builder.build(("restore", "method"), "guidance", section.method,
                           data_shape=data.shape)
    if method is not None:
        if not method.needs_measurement:
            builder.issue(("restore", "method", "kind"), "a measurement method (replacement, "
                          "pigdm, dps, or a plugin's measurement term)", section.method["kind"])
        elif (reason := method.check(diffusion.model)) is not None:
            builder.issue(("restore", "method", "kind"), reason, section.method["kind"])
    chosen = solver
    if section.solver is not None:
        chosen = builder.build(("restore", "solver"), "solver", section.solver)
        if chosen is not None and (reason := chosen.check(diffusion.process)):
            builder.issue(("restore", "solver", "kind"), reason, section.solver["kind"])
    elif chosen is None:
        builder.issue(("restore", "solver"), "a solver (here or in the sample section)", None)
    if section.images != "heldout" and not Path(section.images).expanduser().is_file():
        builder.issue(("restore", "images"), "'heldout' or an existing .npz / .npy file of "
                      "images", section.images)
    if builder.issues:
        raise SpecError(builder.issues, builder.document.origin if builder.document else None)
    return method, chosen


def _conditioning(spec: Spec, builder: Builder, diffusion: Diffusion, data: DataSplits | None,
                  stages: set[str] | None) -> tuple[list[Guidance], torch.Tensor | None]:
    """``sample.guidance`` built and checked against the model, ``sample.labels`` expanded to
    one class per sample (checked against the classes the model, its guidance or its data
    know)."""
    if spec.sample is None or (stages is not None and "sample" not in stages):
        return [], None
    guidance = []
    for index, config in enumerate(spec.sample.guidance):
        term = builder.build(("sample", "guidance", index), "guidance", config)
        if term is None:
            continue
        try:
            reason = term.check(diffusion.model)
        except (OSError, ValueError) as exc:  # a referenced model that does not load
            reason = f"a term whose models load ({exc})"
        if reason is not None:
            builder.issue(("sample", "guidance", index, "kind"), reason, config["kind"])
        guidance.append(term)
    labels = None
    if not builder.issues:
        classes = diffusion.num_classes(guidance)
        if classes is None and data is not None and data.train_labels is not None:
            classes = int(data.train_labels.max()) + 1
        try:
            labels = requested_labels(spec.sample.labels, spec.sample.n, classes)
        except LabelsError as exc:
            builder.issue(("sample", "labels"), exc.expected, spec.sample.labels)
        needing = [spec.sample.guidance[i]["kind"] for i, term in enumerate(guidance)
                   if term.needs_labels]
        if spec.sample.labels is None and needing:
            builder.issue(("sample", "labels"), f"the classes to draw for guidance "
                          f"{', '.join(needing)}: 'all', a class or a list of classes", None)
    if builder.issues:
        raise SpecError(builder.issues, builder.document.origin if builder.document else None)
    return guidance, labels


#: the sample count a metric is first tried at (:func:`check_metric_sizes`)
PROBE_SAMPLES = 32


def check_metric_sizes(spec: Spec, builder: Builder, diffusion: Diffusion, data: DataSplits,
                       labels: torch.Tensor | None) -> None:
    """Try every metric that judges samples on stand-in samples (training examples, slightly
    perturbed so that no two coincide) against this data set, with the run's seed, so that a
    metric needing more samples or held-out examples than the run will have (PRDC's k nearest
    neighbours, a bootstrap's distinct draws) is refused before training. What such a metric
    refuses depends on the sizes and the seed, not on the values, so the refusal is the one
    the run would meet. A model reference not built yet stands in untrained (built from its
    spec). Each refusal is an issue naming the metric and ``sample.n``.

    A metric is tried at ``min(sample.n, PROBE_SAMPLES)`` samples first (spread over the
    requested labels) and, only when it refuses those and ``sample.n`` is larger, at
    ``sample.n``: a metric that applies to fewer samples is taken to apply to more, which
    keeps the check to about a second where the evaluation itself takes many."""
    n = spec.sample.n
    stand_ins: dict[str, TrainedModel] = {}  # by training hash: one per model
    draw = torch.Generator().manual_seed(spec.seed)
    rows = torch.arange(n) % len(data.train)
    samples = data.train[rows].float() + 1e-3 * torch.randn(
        (n, *data.shape), generator=draw)
    for index, config in enumerate(spec.evaluate.metrics):
        kind = config["kind"]
        try:
            metric = builder.registry.build("metric", _with_stand_ins(config, stand_ins),
                                            data_shape=data.shape)
        except (ValueError, TypeError, OSError):
            continue  # construction problems are reported by the build itself
        if not metric.needs_samples:
            continue
        refusal: SpecError | ValueError | None = None
        for count in dict.fromkeys((min(n, PROBE_SAMPLES), n)):
            chosen = torch.linspace(0, n - 1, count).round().long()
            generator = torch.Generator().manual_seed(spec.seed)
            try:
                with torch.random.fork_rng(devices=[]):
                    metric_figures(metric, samples[chosen], data, generator, diffusion.model,
                                   None if labels is None else labels[chosen])
            except (SpecError, ValueError) as exc:
                refusal = exc
                continue
            refusal = None
            break
        if isinstance(refusal, SpecError):
            builder.issues.extend(refusal.issues)
        elif refusal is not None:
            builder.issue(("evaluate", "metrics", index), f"a metric that applies to "
                          f"sample.n = {n} samples and {len(data.heldout)} held-out examples "
                          f"({refusal}): raise sample.n, or leave {kind} out", kind)


def _with_stand_ins(config: Any, stand_ins: dict[str, TrainedModel]) -> Any:
    """``config`` with every model reference not built yet replaced by an untrained stand-in
    built from its spec (once per reference)."""
    if isinstance(config, TrainedModel):
        if config.resolved or config.spec is None or config.hash is None:
            return config
        if config.hash not in stand_ins:
            with torch.random.fork_rng(devices=[]):  # the run's own seeding is untouched
                parts = build_components(config.spec, config.document, stages={"train"})
            stand_ins[config.hash] = TrainedModel.from_diffusion(
                parts.diffusion, parts.data, name=f"untrained {config.ref.describe()}")
        return stand_ins[config.hash]
    if isinstance(config, dict):
        return {key: _with_stand_ins(value, stand_ins) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_stand_ins(value, stand_ins) for value in config]
    return config


def check_construction(spec: Spec, document: Document | None = None,
                       registry: Registry | None = None) -> None:
    """Construct what needs no data — the process, objective, optimizer and solver (checked
    against the process) — so that a constructor's own ``ValueError`` (``sigma_max`` below
    ``sigma_min``, a solver the process cannot drive) is a spec error at ``dkit validate``
    time, not at run time. ``dkit validate --build`` builds everything (it loads the data)."""
    builder = Builder(registry or get_registry(), document)
    process = None
    if spec.model is None:  # a trained model's own sections were checked with its own spec
        if spec.process is not None:
            process = builder.build(("process",), "process", spec.process)
        if spec.objective is not None:
            builder.build(("objective",), "objective", spec.objective)
        builder.build(("train", "optimizer"), "optimizer", spec.train.optimizer)
    if spec.sample is not None:
        solver = builder.build(("sample", "solver"), "solver", spec.sample.solver)
        if solver is not None and process is not None and (reason := solver.check(process)):
            builder.issue(("sample", "solver", "kind"), reason, spec.sample.solver["kind"])
    if builder.issues:
        raise SpecError(builder.issues, document.origin if document else None)


def _new_run_dir(root: Path, name: str) -> Path:
    return make_run_dir(root, name)  # race-free, contained (diffusers_kit/outputs.py)


@dataclass
class Run:
    """One execution of a spec: its components, its folder and what the stages produced.

    The life-cycle hooks (:mod:`diffusers_kit.hookspecs`) receive it. Part of the plugin API:
    ``spec``, ``dir`` (None on data-parallel ranks other than 0), ``results`` (``samples``,
    ``nfe``, ``metrics``, ``train_loss``, ``train_hash``, ``latent_scale`` for an autoencoder),
    ``components`` (``.diffusion`` — also :attr:`diffusion` —, ``.data``, ``.solver``), ``log``
    and ``quiet``; anything else may change."""

    spec: Spec
    components: Components
    dir: Path | None  # None on data-parallel ranks other than 0: they write nothing
    console: Console
    quiet: bool = False
    from_dir: Path | None = None
    resume_from: Path | None = None  # the checkpoint a resumed run continues from
    resume_step: int = 0
    distributed: Distributed = field(default_factory=Distributed)
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("diffusers_kit.run"))

    @property
    def diffusion(self) -> Diffusion:
        return self.components.diffusion

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=self.console, disable=self.quiet, transient=False,
        )


# -- stages --------------------------------------------------------------------------------------
def _stage_data(run: Run) -> None:
    data = run.components.data
    run.log.info("data: %d train / %d held-out examples of shape %s",
                 len(data.train), len(data.heldout), data.shape)


def _stage_train(run: Run) -> None:
    spec, diffusion = run.spec, run.diffusion
    hook = get_plugin_manager().hook
    checkpoint = run.dir / CHECKPOINT if run.dir is not None else None
    train = spec.train

    def save(step: int) -> None:
        if checkpoint is not None:
            diffusion.step = step
            diffusion.save(checkpoint, {"spec": spec.name})
            run.log.info("checkpoint at step %d", step)

    with run.progress() as progress:
        task = progress.add_task("train", total=train.steps, status="")

        def on_log(step: int, loss: float) -> None:
            progress.update(task, status=f"loss {loss:.4f}")
            run.log.info("step %d loss %.6f", step, loss)
            hook.dkit_train_step(run=run, step=step, loss=loss)

        if run.resume_from is not None:
            done = run.resume_step
            progress.advance(task, min(done, train.steps))
            run.log.info("resuming from step %d of %s", done, run.resume_from)
        try:
            diffusion.fit(
                run.components.data, steps=train.steps, batch_size=train.batch_size,
                optimizer=run.components.optimizer, ema_decay=train.ema_decay,
                grad_clip=train.grad_clip, seed=spec.seed, log_every=train.log_every,
                checkpoint_every=train.checkpoint_every, lr_schedule=train.lr_schedule,
                warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio,
                grad_accumulation=train.grad_accumulation, precision=train.precision,
                compile=train.compile, resume=run.resume_from, distributed=run.distributed,
                on_log=on_log, on_checkpoint=save,
                progress=lambda k: progress.advance(task, k),
            )
        except TrainingDiverged as exc:
            run.log.error("training stopped: %s", exc)
            raise
        except KeyboardInterrupt as exc:
            run.log.warning("interrupted at step %d", diffusion.trainer.step
                            if diffusion.trainer else 0)
            if isinstance(exc, TrainingInterrupted):
                exc.run_dir = run.dir
            raise
    trainer = diffusion.trainer
    first_stage = isinstance(diffusion.network, Autoencoder)
    if first_stage:  # fit calibrated the latent scale after the last checkpoint: save it
        run.results["latent_scale"] = float(diffusion.network.scale)
        run.log.info("latent scale factor 1/std(z) = %.6g", float(diffusion.network.scale))
    if trainer is not None and (trainer.last_checkpoint != trainer.step or first_stage):
        trainer.checkpoint(save)  # the final state, resumable (e.g. with more steps)
    losses = diffusion.train_log.losses
    run.results["train_loss"] = losses[-1] if losses else float("nan")
    if checkpoint is not None:
        run.log.info("checkpoint written to %s", checkpoint)


def load_previous(diffusion: Diffusion, from_dir: Path, field: str = "--from",
                  resolved: dict[str, Any] | None = None, note: Console | None = None) -> int:
    """Load ``from_dir``'s checkpoint into ``diffusion``; a mismatch is a spec error naming
    ``field`` (the option or spec field that chose the folder), a corrupt file a
    :class:`~diffusers_kit.checkpoint.CheckpointError`. With ``resolved`` (this run's resolved
    spec) the training fields that differ from the checkpoint's run are printed on ``note``."""
    source = from_dir / CHECKPOINT
    if resolved is not None and note is not None:
        changed = previous_differences(from_dir, resolved)
        if changed:
            note.print(f"note: the checkpoint in {from_dir} was trained with a spec that differs "
                       f"in {', '.join(changed)}", soft_wrap=True, markup=False)
    try:
        diffusion.load(source)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        expected = f"a checkpoint whose weights fit this spec's network ({first})"
        issue = SpecIssue((field,), expected, str(source), None,
                          "command line" if field.startswith("-") else None)
        raise SpecError([issue]) from None
    return diffusion.step


def open_run(run_dir: str | Path, overrides: list[str] | None = None,
             solver: str | None = None) -> tuple[Spec, Components]:
    """Rebuild a finished run's components from its resolved ``spec.yaml`` and load its
    checkpoint. ``RUN_DIR/../latest`` is followed; ``overrides`` change fields of that spec;
    ``solver`` (a registered name or a YAML mapping) replaces its solver."""
    folder = follow_latest(Path(run_dir).expanduser())
    if not (folder / SPEC_FILE).is_file() or not (folder / CHECKPOINT).is_file():
        raise SpecError([SpecIssue(("RUN_DIR",), f"a run folder holding {SPEC_FILE} and "
                                   f"{CHECKPOINT} (relative to the working directory "
                                   f"{Path.cwd()})", str(run_dir), None, "command line")])
    document = load_file(folder / SPEC_FILE)
    if solver is not None:
        value = component_option("--solver", solver, "a solver name or a YAML mapping such as "
                                 "'{kind: ddim, steps: 20}'")
        section = document.data.get("sample")
        if not isinstance(section, dict):
            section = document.data["sample"] = {}
        section["solver"] = value
        document.overridden[("sample", "solver")] = f"--solver {solver}"
    if overrides:
        apply_overrides(document, overrides)
    spec = validate(document, get_registry())
    components = build_components(spec, document)
    load_previous(components.diffusion, folder, "RUN_DIR")
    return spec, components


def _stage_sample(run: Run) -> None:
    spec, diffusion, solver = run.spec, run.diffusion, run.components.solver
    n = spec.sample.n
    batches = batch_count(n, spec.sample.batch_size, diffusion.network.data_shape)
    with run.progress() as progress:
        task = progress.add_task("sample", total=solver.total_steps(diffusion.process) * batches,
                                 status=spec.sample.solver["kind"])
        result = diffusion.sample(n, solver, seed=spec.seed, batch_size=spec.sample.batch_size,
                                  progress=lambda k: progress.advance(task, k),
                                  guidance=run.components.guidance,
                                  labels=run.components.labels)
    samples = result.samples.float().cpu()
    get_plugin_manager().hook.dkit_samples_ready(run=run, samples=samples)
    run.results["samples"] = samples
    run.results["nfe"] = result.nfe
    arrays = {"samples": samples.numpy(),
              "display": run.components.dataset.to_display(samples).numpy()}
    if result.labels is not None:
        run.results["labels"] = result.labels
        arrays["labels"] = result.labels.numpy()
    np.savez_compressed(run.dir / "samples.npz", **arrays)
    run.log.info("%d samples, %d network evaluations", n, result.nfe)


def _stage_restore(run: Run) -> None:
    section, components = run.spec.restore, run.components
    assert section is not None and components.restore_method is not None
    images = restoration_images(section.images, components.data, section.n)
    solver = components.restore_solver
    assert solver is not None
    count = len(images) * section.samples_per_image
    batches = batch_count(count, section.batch_size, run.diffusion.network.data_shape)
    with run.progress() as progress:
        task = progress.add_task("restore", status=section.method["kind"],
                                 total=solver.total_steps(run.diffusion.process) * batches)
        result = restore(run.diffusion, components.restore_method, images, solver,
                         samples_per_image=section.samples_per_image, seed=run.spec.seed,
                         batch_size=section.batch_size,
                         progress=lambda k: progress.advance(task, k))
    write_restoration(result, run.dir, components.dataset)
    run.results["restore"] = result.metrics
    for key, text in summarize(result.metrics):
        run.log.info("restore %s = %s", key, text)


def _stage_evaluate(run: Run) -> None:
    samples = run.results.get("samples")  # None when the spec only trains
    generator = torch.Generator().manual_seed(run.spec.seed)
    with run.diffusion.sampling_weights() as model:
        metrics = evaluate_metrics(run.components.metrics, samples, run.components.data,
                                   generator, model, run.results.get("labels"), run.log,
                                   run.diffusion.model_data(run.components.data))
    run.results["metrics"] = metrics
    for key, text in summarize(metrics):  # value [interval] floor [interval] n, per statistic
        run.log.info("metric %s = %s", key, text)


def evaluate_metrics(metrics: list[tuple[str, Metric]], samples: torch.Tensor | None,
                     data: DataSplits, generator: torch.Generator, model: Any,
                     labels: torch.Tensor | None = None, log: logging.Logger | None = None,
                     model_data: DataSplits | None = None) -> dict[str, Any]:
    """Every metric on ``samples`` (those that need none when there are none), each result
    checked (:func:`checked_metric`), a metric that does not apply reported as a spec error
    naming ``evaluate.metrics[i]``, and the out-of-range share of the samples: what a run's
    evaluate stage and ``dkit evaluate`` both compute. ``model_data``: the data as the model
    sees it (a latent model's encoded data; :func:`~diffusers_kit.metrics.base.metric_figures`)."""
    out: dict[str, Any] = {}
    for index, (name, metric) in enumerate(metrics):
        if samples is None and metric.needs_samples:
            if log is not None:
                log.info("metric %s skipped: this run draws no samples", name)
            continue
        try:
            values = metric_figures(metric, samples, data, generator, model, labels,
                                    model_data)
        except ValueError as exc:  # the metric does not apply to these samples / this data
            raise SpecError([SpecIssue(("evaluate", "metrics", index), f"a metric that "
                                       f"applies to this run ({exc})", name, None,
                                       None)]) from exc
        out.update(checked_metric(name, metric, values))
    if samples is not None and data is not None:
        out.update(out_of_range(samples, data.train))
    return out


def checked_metric(name: str, metric: Metric, values: Any) -> dict[str, Any]:
    """A metric's result must map names to numbers (or None, or a short string): anything else
    (a tensor, a list) is a bug in the metric, named here rather than when metrics.json is
    written at the end of the run. Numbers are made plain floats."""
    cls = type(metric).__name__
    if not isinstance(values, dict):
        raise PluginOutputError(f"metric {name} ({cls}).evaluate returned a "
                                f"{type(values).__name__}; expected a dict of numbers")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(key, str):
            raise PluginOutputError(f"metric {name} ({cls}): {key!r} = {value!r} is not a "
                                    "number under a string name")
        if value is None or isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = float(value) if isinstance(value, float) else value
        else:
            raise PluginOutputError(f"metric {name} ({cls}): {key!r} is a "
                                    f"{type(value).__name__}; expected a number (use float())")
    return out


def _stage_report(run: Run) -> None:
    samples = run.results.get("samples")
    dataset = run.components.dataset
    if samples is not None:
        if dataset.modality == "image":
            columns = run.spec.output.grid_columns or columns_per_class(
                run.results.get("labels"))
            picture = image_grid(dataset.to_display(samples), columns)
        else:
            picture = scatter_plot(samples, run.components.data.heldout)
        picture.save(run.dir / "samples.png")
    if isinstance(run.diffusion.network, Autoencoder) and dataset.modality == "image":
        reconstructions_figure(run.diffusion, run.components.data.heldout,
                               dataset).save(run.dir / "reconstructions.png")
    summary = {k: v for k, v in run.results.items() if k not in ("samples", "labels")}
    summary.update({f"time_{k}_s": round(v, 3) for k, v in run.timings.items()})
    metrics = summary.pop("metrics", {})
    # NaN / infinity are not JSON: written as null (parse_constant maps them on the way back)
    finite = json.loads(json.dumps({**metrics, **summary}), parse_constant=lambda _: None)
    (run.dir / "metrics.json").write_text(json.dumps(finite, indent=2, allow_nan=False) + "\n")


def reconstructions_figure(diffusion: Diffusion, images: torch.Tensor, dataset: Any,
                           count: int = 12, rows: int = 2) -> Any:
    """An autoencoder run's picture: ``rows`` pairs of rows, held-out originals above their
    reconstructions ``decode(encode(x))`` (the EMA weights, the posterior mean)."""
    count = max(1, min(count, len(images)))
    shown = images[:count * min(rows, len(images) // count)].float()  # whole rows only
    with diffusion.sampling_weights() as model:
        back = reconstructions(model.network, shown)
    pairs: list[tuple[str, torch.Tensor]] = []
    for r in range(len(shown) // count):
        part = slice(r * count, (r + 1) * count)
        pairs += [("original", dataset.to_display(shown[part])),
                  ("reconstruction", dataset.to_display(back[part]))]
    return labelled_grid(pairs, title="held-out images and their reconstructions")


GRAPH = (
    Stage("data", (), ("dataset",), _stage_data),
    Stage("train", ("dataset",), ("checkpoint",), _stage_train),
    Stage("sample", ("checkpoint",), ("samples",), _stage_sample),
    Stage("restore", ("checkpoint", "dataset"), ("restore.png",), _stage_restore),
    Stage("evaluate", ("samples", "dataset"), ("metrics",), _stage_evaluate),
    Stage("report", (), ("samples.png", "metrics.json"), _stage_report),
)


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


# the spec fields a resumed run may change: how long, how often to log / save, what comes after
RESUMABLE_CHANGES = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every")}


def _differences(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if (*path, key) not in RESUMABLE_CHANGES:
                found += _differences(old.get(key), new.get(key), (*path, key))
        return found
    return [] if old == new else [".".join(path)]


def previous_differences(run_dir: Path, resolved: dict[str, Any]) -> list[str]:
    """The training fields (seed, data, process, network, objective, train) in which
    ``resolved`` differs from the spec.yaml of ``run_dir`` ([] when that file is unreadable)."""
    try:
        previous = yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(previous, dict):
        return []
    return [d for section in TRAINING_SECTIONS
            for d in _differences(previous.get(section), resolved.get(section), (section,))]


def _allowed(field: str, allow_change: tuple[str, ...]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow_change)


# what a resumable checkpoint must hold besides the weights (see Trainer.state)
TRAINING_META = ("train_step", "micro", "since", "optimizer", "log")
TRAINING_TENSORS = ("trainer.order", "trainer.running", "trainer.first_bad", "rng.data",
                    "rng.torch")


def check_resumable(resume_dir: Path, resolved: dict[str, Any], world: int = 1,
                    allow_change: tuple[str, ...] = (), diffusion: Diffusion | None = None) -> int:
    """The step of ``resume_dir``'s checkpoint, after checking it was trained by this spec.

    The checkpoint is read whole and its checksum verified (a corrupt one raises
    :class:`~diffusers_kit.checkpoint.CheckpointError`); temporary files a killed write left in
    the folder are removed. Spec fields that differ from the run's are listed; those named in
    ``allow_change`` (a field or a section: ``train.optimizer.lr``, ``train.optimizer``) may
    differ, for example to recover from divergence with a smaller learning rate. With
    ``diffusion``, its network must load the checkpoint's weights."""
    def refuse(expected: str) -> SpecError:
        return SpecError([SpecIssue(("--resume",), expected, str(resume_dir), None,
                                    "command line")])

    if not (resume_dir / CHECKPOINT).is_file():
        raise refuse(f"a run folder holding {CHECKPOINT}")
    remove_orphans(resume_dir, CHECKPOINT)
    tensors, metadata = load_checkpoint(resume_dir / CHECKPOINT)
    try:
        previous = yaml.safe_load((resume_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise refuse(f"a readable run folder with its spec.yaml ({exc})") from None
    if not isinstance(previous, dict):
        raise CheckpointError(resume_dir / "spec.yaml", "not the resolved spec of a run "
                              "(a YAML mapping)")
    training = metadata.get("training")
    if training is None:
        raise refuse("a checkpoint with training state (this one holds weights only)")
    missing = [k for k in TRAINING_META if not isinstance(training, dict) or k not in training]
    missing += [k for k in TRAINING_TENSORS if f"train.{k}" not in tensors]
    if missing:
        raise CheckpointError(resume_dir / CHECKPOINT, "its training state lacks "
                              f"{', '.join(missing)}: not a checkpoint dkit can resume")
    try:
        step = int(training["train_step"])
        ranks = int(training.get("world", 1))
        json.loads(training["optimizer"])["param_groups"]
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(resume_dir / CHECKPOINT, "its training state is malformed "
                              "(train_step, world or optimizer)") from None
    changed = [d for section in TRAINING_SECTIONS
               for d in _differences(previous.get(section), resolved.get(section), (section,))]
    if ranks != world:
        raise refuse(f"as many data-parallel ranks as the run was trained with ({ranks}; this "
                     f"run has {world}), so that the data order continues")
    refused = [d for d in changed if not _allowed(d, allow_change)]
    if refused:
        raise refuse("a run of this same spec: only train.steps, train.log_every, "
                     "train.checkpoint_every and the sampling / evaluation sections may change; "
                     f"this spec differs in {', '.join(refused)} (to change them on purpose, "
                     f"add --allow-change {' --allow-change '.join(refused)})")
    if diffusion is not None and changed:
        try:
            diffusion.network.load_state_dict(unprefixed("network", tensors))
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise refuse(f"a checkpoint whose weights fit this spec's network, changed in "
                         f"{', '.join(changed)} ({first})") from None
    return step




def _link_checkpoint(source: Path, run_dir: Path) -> None:
    """Give ``run_dir`` the checkpoint it sampled from: a hard link (no copy) where the file
    system allows, else a copy; either way the folder is self-contained for later references."""
    target = run_dir / CHECKPOINT
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
                                       str(from_path), None, "command line")])
    console = console or make_console(stderr=True)
    root_path = Path(root) if root is not None else Path(spec.output.root)
    root_path = checked_root(root_path, spec.name, document, resume_path)  # before any mkdir
    registry = get_registry()
    distributed = distributed_from_env(resolve_device(spec.device).type)
    settings = BuildSettings(root_path, rebuild, console, quiet)
    # what the run would refuse is refused before any training, a dependency's included: with
    # models still to build (or find), the spec is checked with untrained stand-ins first
    unbuilt = any(model.run_dir is None for _, model in references(spec, registry))
    if unbuilt:
        build_components(spec, document, registry, distributed=distributed, stages=stages,
                         check_metrics=True)
    build_references(spec, registry, settings)  # each in its own run folder, before this one
    components = build_components(spec, document, registry, distributed=distributed,
                                  stages=stages, check_metrics=not unbuilt)
    components.resolved["output"]["root"] = str(root_path)
    digest = spec_hash(spec)
    resume_step = 0
    if resume_path is not None:
        resume_step = check_resumable(resume_path, components.resolved, distributed.world,
                                      allow_change, components.diffusion)
    if from_path is not None:  # before any folder is created; with train: a warm start
        load_previous(components.diffusion, from_path, resolved=components.resolved, note=console)
    if not distributed.main:  # a data-parallel helper: train, write nothing
        run = Run(spec, components, None, console, True, None,
                  resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
        _stage_train(run)
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
        run_dir = resume_path if resume_path is not None else _new_run_dir(root_path, spec.name)
        checkpoint_from = reused or (trained.run_dir if trained is not None else None)
        if checkpoint_from is not None:
            _link_checkpoint(checkpoint_from / CHECKPOINT, run_dir)
        elif from_path is not None and "train" not in stages:
            # sampled or evaluated with --from's weights: recorded (so the run says which
            # training it shows), not linked (the folder holds what this run made)
            checkpoint_from = from_path
        run = Run(spec, components, run_dir, console, quiet, from_path,
                  resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
        run.results["train_hash"] = digest
        run.results["dependencies"] = [d.as_dict() for d in settings.dependencies]
        if checkpoint_from is not None:
            run.results["checkpoint_from"] = str(checkpoint_from)
        record = read_record(run_dir) if resume_path is not None else None
        record = {**(record or {}), "name": spec.name, "status": "running",
                  "train_hash": digest, "started": now(), "finished": None, "train_finished": None,
                  "trained": "train" in stages or bool(record and record.get("trained")),
                  "checkpoint_from": str(checkpoint_from) if checkpoint_from else None,
                  "dependency": dependency, "stages": sorted(stages),
                  "dependencies": run.results["dependencies"]}
        with alive_marker(run_dir):
            write_record(run_dir, record)
            try:
                _run_stages(run, stages, reused, trained,
                            after_train=lambda: _training_finished(run_dir, record))
            except (TrainingInterrupted, KeyboardInterrupt):
                record.update(status="interrupted", step=components.diffusion.step)
                write_record(run_dir, record)
                raise
            except BaseException:
                record.update(status="failed", step=components.diffusion.step)
                write_record(run_dir, record)
                if record.get("train_finished"):
                    _say_training_kept(console, run_dir, document, stages)
                raise
            record.update(status="finished", finished=now(), step=components.diffusion.step,
                          metrics=_scalar_metrics(run.results.get("metrics", {})))
            write_record(run_dir, record)
        point_latest(run_dir)
    return run


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


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
        (run_dir / "spec.yaml").write_text(
            yaml.safe_dump(components.resolved, sort_keys=False), encoding="utf-8")
        network = components.diffusion.network
        run.log.info("run %s on %s; network %s with %d parameters", spec.name,
                     components.diffusion.device, type(network).__name__,
                     network.parameter_count())
        run.log.info("training hash %s", run.results["train_hash"])
        for dep in run.results["dependencies"]:
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
                                                     metrics=run.results.get("metrics", {}))
        leave_distributed(run.distributed)
    finally:
        run.log.removeHandler(handler)
        handler.close()


def _grouped(dependencies: list[dict[str, Any]]) -> list[tuple[list[str], dict[str, Any]]]:
    """Dependencies on the same run folder, once each, with every field that named it."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for dep in dependencies:
        groups.setdefault(dep["run"], ([], dep))[0].append(dep["field"])
    return list(groups.values())


def summary_table(run: Run) -> Table:
    """A rich table of the run: where it is, how long each stage took, the metrics."""
    table = Table(title=f"dkit run {run.spec.name}", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("device", str(run.diffusion.device))
    table.add_row("parameters", f"{run.diffusion.network.parameter_count():,}")
    for stage, seconds in run.timings.items():
        table.add_row(f"{stage} time", f"{seconds:.1f} s")
    if "checkpoint_from" in run.results:
        table.add_row("checkpoint from", str(run.results["checkpoint_from"]))
    for fields, dep in _grouped(run.results.get("dependencies", [])):
        how = "reused" if dep["reused"] else "built" if dep["reused"] is False else "given"
        label = fields[0] if len(fields) == 1 else f"{fields[0]} (+{len(fields) - 1} more)"
        table.add_row(label, f"{how} {dep['run']}")
    if "train_loss" in run.results:
        table.add_row("final train loss", f"{run.results['train_loss']:.4f}")
    if "latent_scale" in run.results:
        table.add_row("latent scale factor", f"{run.results['latent_scale']:.4g}")
    if "nfe" in run.results:
        table.add_row("network evaluations", str(run.results["nfe"]))
    for key, text in summarize(run.results.get("metrics", {})):
        table.add_row(key, Text(text))  # value [low, high]  floor F [low, high]  n=N
    for key, text in summarize(run.results.get("restore", {})):
        table.add_row(f"restore {key}", Text(text))
    return table


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


def build_reference(model: TrainedModel, *, root: Path, rebuild: bool = False,
                    console: Console | None = None, quiet: bool = False) -> Path:
    """Make sure the model ``model`` refers to exists as a finished run; returns its folder.

    A run-folder reference is used as it is. A spec reference reuses the newest finished run
    with its hash under ``root`` (unless ``rebuild``), else runs the spec's train stage there.
    """
    if model.run_dir is not None:  # a run folder (or one recorded when the reference was built)
        return model.run_dir
    assert model.spec is not None and model.hash is not None and model.document is not None
    what = f"{model.spec.name} ({model.hash[:12]})"
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
                            console=settings.console, quiet=settings.quiet)
        assert model.run_dir is not None and model.hash is not None
        done[model.hash] = (model.run_dir, model.reused)
        settings.dependencies.append(Dependency(dotted(path), model.ref.to_config(),
                                                str(model.run_dir), model.hash, model.reused))


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

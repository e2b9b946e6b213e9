"""The stages of a run — data, train, sample, restore, evaluate, report — and the :class:`Run`
they share, which the life-cycle hooks receive (:mod:`diffusers_kit.hookspecs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.data.base import DataSplits
from diffusers_kit.diffusion import (
    Diffusion,
    PluginOutputError,
    batch_count,
)
from diffusers_kit.metrics.base import Metric, metric_figures
from diffusers_kit.metrics.floor import summarize
from diffusers_kit.metrics.range import out_of_range
from diffusers_kit.metrics.reconstruction import reconstructions
from diffusers_kit.registry import (
    get_plugin_manager,
)
from diffusers_kit.report import columns_per_class, image_grid, labelled_grid, scatter_plot
from diffusers_kit.restore import Restoration, restoration_images, restore, write_restoration
from diffusers_kit.run.build import Components, sampling_ema
from diffusers_kit.run_folder import (
    CHECKPOINT,
    METRICS,
    check_folder,
    write_json,
    write_samples,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document
from diffusers_kit.spec.models import Spec
from diffusers_kit.train import (
    Distributed,
    PeerLost,
    TrainingDiverged,
    TrainingInterrupted,
)

STAGES = ("data", "train", "sample", "restore", "evaluate", "report")


@dataclass
class Stage:
    """A stage: its name (as ``--only`` spells it) and the function that runs it."""

    name: str
    run: Callable[[Run], None]


@dataclass(eq=False)
class Results(MutableMapping[str, Any]):
    """What a run's stages produced, as typed fields (None: not produced by this run).

    Also a mapping from field name to value over the fields that are set, in the order the
    stages set them, as ``run.results`` was in 0.2 (``run.results["metrics"]``); keys that are
    not fields (a plugin's own) are kept in :attr:`extra`."""

    train_hash: str | None = None  # the training hash of the model the run used
    dependencies: list[dict[str, Any]] | None = None  # the models referenced, as run.json has
    checkpoint_from: str | None = None  # the run folder whose checkpoint was reused or loaded
    latent_scale: float | None = None  # an autoencoder's latent scale factor 1/std(z)
    train_loss: float | None = None  # the last logged training loss
    samples: torch.Tensor | None = None  # (n, *data_shape), float32 on the CPU
    nfe: int | None = None  # network evaluations the sampling took
    labels: torch.Tensor | None = None  # the class of each sample, when labels were drawn
    restore: dict[str, Any] | None = None  # the restoration's figures
    metrics: dict[str, Any] | None = None  # the evaluated metrics (metrics.json)
    extra: dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "extra"]

    def __getitem__(self, key: str) -> Any:
        if key in self._fields() and getattr(self, key) is not None:
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._fields():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._fields() and getattr(self, key) is not None:
            setattr(self, key, None)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self._fields() if getattr(self, name) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class Run:
    """One execution of a spec: its components, its folder and what the stages produced.

    The life-cycle hooks (:mod:`diffusers_kit.hookspecs`) receive it. Part of the plugin API:
    ``spec``, ``dir`` (None on data-parallel ranks other than 0), ``results`` (a
    :class:`Results`: ``samples``, ``nfe``, ``metrics``, ``train_loss``, ``train_hash``,
    ``latent_scale`` for an autoencoder, as attributes or as mapping keys), ``components``
    (``.diffusion`` — also :attr:`diffusion` —, ``.data``, ``.solver``), ``log`` and
    ``quiet``; anything else may change."""

    spec: Spec
    components: Components
    dir: Path | None  # None on data-parallel ranks other than 0: they write nothing
    console: Console
    quiet: bool = False
    from_dir: Path | None = None
    resume_from: Path | None = None  # the checkpoint a resumed run continues from
    resume_step: int = 0
    distributed: Distributed = field(default_factory=Distributed)
    results: Results = field(default_factory=Results)
    timings: dict[str, float] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("diffusers_kit.run"))

    @property
    def diffusion(self) -> Diffusion:
        return self.components.diffusion

    def progress(self) -> Progress:
        return progress_bars(self.console, self.quiet)


def progress_bars(console: Console, quiet: bool) -> Progress:
    """The progress bars of a stage (description, bar, steps, status, time), on ``console``."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console, disable=quiet, transient=False,
    )


# -- results that are not numbers ------------------------------------------------------------
class NonFiniteResult(Exception):
    """A stage produced NaN or infinite samples or metrics: the command fails (exit status 1)
    naming the stage and the component, rather than report garbage as a result; what was
    written before stays."""


def require_finite(values: torch.Tensor, stage: str, component: str) -> None:
    """Raise :class:`NonFiniteResult` when ``values`` (a stage's samples) are not all finite."""
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        rows = int(bad.reshape(len(values), -1).any(dim=1).sum()) if values.ndim else 1
        raise NonFiniteResult(f"the {stage} stage produced {rows} of {len(values)} samples with "
                              f"NaN or infinite values ({component}); they were not written")


#: figures a metric's result is given besides its own values (metrics.base.metric_figures)
DERIVED = ("_low", "_high", "_floor", "_n", "_ratio")


def non_finite_metrics(metrics: dict[str, Any]) -> list[str]:
    """The metric values (not their intervals, floors or ratios) that are NaN or infinite."""
    return [key for key, value in metrics.items()
            if isinstance(value, float) and not math.isfinite(value)
            and not key.endswith(DERIVED)]


# -- stages --------------------------------------------------------------------------------------
def stage_data(run: Run) -> None:
    data = run.components.data
    run.log.info("data: %d train / %d held-out examples of shape %s",
                 len(data.train), len(data.heldout), data.shape)


def stage_train(run: Run) -> None:
    spec, diffusion = run.spec, run.diffusion
    hook = get_plugin_manager().hook
    checkpoint = run.dir / CHECKPOINT if run.dir is not None else None
    train = spec.train

    def save(step: int) -> None:
        if checkpoint is not None:
            check_folder(run.dir)  # deleted during training: stop, never recreate it
            diffusion.step = step
            diffusion.save(checkpoint, {"spec": spec.name})
            run.log.info("checkpoint at step %d", step)

    with run.progress() as progress:
        task = progress.add_task("train", total=train.steps, status="")

        def on_log(step: int, loss: float) -> None:
            check_folder(run.dir)
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
                post_hoc_sigma_rels=(train.post_hoc_ema.sigma_rels if train.post_hoc_ema
                                     else ()),
                post_hoc_every=train.post_hoc_ema.every if train.post_hoc_ema else 100,
            )
        except TrainingDiverged as exc:
            run.log.error("training stopped: %s", exc)
            raise
        except PeerLost as exc:
            run.log.error("training stopped: %s", exc)
            exc.run_dir = run.dir
            raise
        except KeyboardInterrupt as exc:
            run.log.warning("interrupted at step %d", diffusion.trainer.step
                            if diffusion.trainer else 0)
            if isinstance(exc, TrainingInterrupted):
                exc.run_dir = run.dir
            raise
    trainer = diffusion.trainer
    if trainer is not None and run.distributed.active:
        run.log.info("gradients averaged over the ranks by %s", "DistributedDataParallel"
                     if trainer.ddp is not None else "one all-reduce after backward")
    first_stage = isinstance(diffusion.network, Autoencoder)
    if first_stage:  # fit calibrated the latent scale after the last checkpoint: save it
        run.results.latent_scale = float(diffusion.network.scale)
        run.log.info("latent scale factor 1/std(z) = %.6g", float(diffusion.network.scale))
    if trainer is not None and (trainer.last_checkpoint != trainer.step or first_stage):
        trainer.checkpoint(save)  # the final state, resumable (e.g. with more steps)
    losses = diffusion.train_log.losses
    run.results.train_loss = losses[-1] if losses else float("nan")
    if checkpoint is not None:
        run.log.info("checkpoint written to %s", checkpoint)


def stage_sample(run: Run) -> None:
    spec, diffusion, solver = run.spec, run.diffusion, run.components.solver
    n = spec.sample.n
    error = sampling_ema(spec, diffusion)  # sample.ema_sigma_rel: the post-hoc EMA's weights
    if error is not None:
        run.log.info("post-hoc EMA sigma_rel %g: profile error %.3g of its norm",
                     spec.sample.ema_sigma_rel, error)
    batches = batch_count(n, spec.sample.batch_size, diffusion.network.data_shape)
    with run.progress() as progress:
        task = progress.add_task("sample", total=solver.total_steps(diffusion.process) * batches,
                                 status=spec.sample.solver["kind"])
        result = diffusion.sample(n, solver, seed=spec.seed, batch_size=spec.sample.batch_size,
                                  progress=lambda k: progress.advance(task, k),
                                  guidance=run.components.guidance,
                                  labels=run.components.labels)
    samples = result.samples.float().cpu()
    require_finite(samples, "sample", f"solver {spec.sample.solver['kind']}")
    get_plugin_manager().hook.dkit_samples_ready(run=run, samples=samples)
    run.results.samples = samples
    run.results.nfe = result.nfe
    if result.labels is not None:
        run.results.labels = result.labels
    write_samples(run.dir, samples.numpy(), run.components.dataset.to_display(samples).numpy(),
                  None if result.labels is None else result.labels.numpy())
    run.log.info("%d samples, %d network evaluations", n, result.nfe)


def stage_restore(run: Run) -> None:
    result = restore_into(run.dir, run.spec, run.components, run.progress())
    run.results.restore = result.metrics
    for key, text in summarize(result.metrics):
        run.log.info("restore %s = %s", key, text)


def restore_images(spec: Spec, components: Components,
                   document: Document | None = None) -> torch.Tensor:
    """The ``restore.n`` images a restoration restores (held-out, or ``restore.images``).
    Images that cannot be restored are a spec error naming ``restore.images`` (located in
    ``document`` when given)."""
    section = spec.restore
    assert section is not None
    try:
        return restoration_images(section.images, components.data, section.n)
    except ValueError as exc:
        line, where = document.locate(("restore", "images")) if document else (None, None)
        raise SpecError([SpecIssue(("restore", "images"), str(exc), section.images, line,
                                   where)]) from None


def restore_into(folder: Path, spec: Spec, components: Components, progress: Progress,
                 document: Document | None = None,
                 rows: tuple[int, int] | None = None) -> Restoration:
    """The restore stage's work, shared with ``dkit restore``: ``restore.n`` images
    (:func:`restore_images`) measured through the method's forward model, restored with the
    restore solver, judged, and written into ``folder`` (``restore.png``, ``restore.npz``,
    ``restore.json``). ``rows``: only these restorations, whole images (a shard:
    :func:`diffusers_kit.restore.restore`)."""
    section = spec.restore
    method, solver = components.restore_method, components.restore_solver
    assert section is not None and method is not None and solver is not None
    images = restore_images(spec, components, document)
    start, stop = (0, len(images) * section.samples_per_image) if rows is None else rows
    diffusion = components.diffusion
    batches = batch_count(stop - start, section.batch_size, diffusion.network.data_shape)
    with progress:
        task = progress.add_task("restore", status=section.method["kind"],
                                 total=solver.total_steps(diffusion.process) * batches)
        result = restore(diffusion, method, images, solver,
                         samples_per_image=section.samples_per_image, seed=spec.seed,
                         batch_size=section.batch_size,
                         progress=lambda k: progress.advance(task, k), rows=rows)
    require_finite(result.samples, "restore", f"method {section.method['kind']}")
    folder.mkdir(parents=True, exist_ok=True)
    write_restoration(result, folder, components.dataset)
    return result


def stage_evaluate(run: Run) -> None:
    samples = run.results.samples  # None when the spec only trains
    generator = torch.Generator().manual_seed(run.spec.seed)
    with run.diffusion.sampling_weights() as model:
        metrics = evaluate_metrics(run.components.metrics, samples, run.components.data,
                                   generator, model, run.results.labels, run.log,
                                   run.diffusion.model_data(run.components.data))
    run.results.metrics = metrics
    for key, text in summarize(metrics):  # value [interval] floor [interval] n, per statistic
        run.log.info("metric %s = %s", key, text)
    bad = non_finite_metrics(metrics)
    if bad:  # written (as null) for a look, then the run fails
        write_json(run.dir / METRICS, metrics)
        raise NonFiniteResult(f"the evaluate stage gave NaN or infinite values for "
                              f"{', '.join(bad)} (metrics.json holds them as null)")


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


def stage_report(run: Run) -> None:
    samples = run.results.samples
    dataset = run.components.dataset
    if samples is not None:
        if dataset.modality == "image":
            columns = run.spec.output.grid_columns or columns_per_class(
                run.results.labels)
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
    write_json(run.dir / METRICS, {**metrics, **summary})  # NaN / infinity as null


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
    Stage("data", stage_data),
    Stage("train", stage_train),
    Stage("sample", stage_sample),
    Stage("restore", stage_restore),
    Stage("evaluate", stage_evaluate),
    Stage("report", stage_report),
)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


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
    if run.results.checkpoint_from is not None:
        table.add_row("checkpoint from", run.results.checkpoint_from)
    for names, dep in _grouped(run.results.dependencies or []):
        how = "reused" if dep["reused"] else "built" if dep["reused"] is False else "given"
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
        table.add_row(label, f"{how} {dep['run']}")
    if run.results.train_loss is not None:
        table.add_row("final train loss", f"{run.results.train_loss:.4f}")
    if run.results.latent_scale is not None:
        table.add_row("latent scale factor", f"{run.results.latent_scale:.4g}")
    if run.results.nfe is not None:
        table.add_row("network evaluations", str(run.results.nfe))
    for key, text in summarize(run.results.metrics or {}):
        table.add_row(key, Text(text))  # value [low, high]  floor F [low, high]  n=N
    for key, text in summarize(run.results.restore or {}):
        table.add_row(f"restore {key}", Text(text))
    return table

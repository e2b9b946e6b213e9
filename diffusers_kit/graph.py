"""The run graph: data -> train -> sample -> evaluate -> report, built from a validated spec.

Every component is built (and every spec problem reported) before the run folder is created, so
a broken spec never leaves a half-written folder behind. Each stage declares what it needs and
what it produces; ``only`` selects stages and ``from_dir`` supplies a previous run's checkpoint,
so a trained model can be sampled again without retraining.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffusers_kit.api import Diffusion, resolve_device
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.metrics.base import Metric
from diffusers_kit.registry import Registry, get_plugin_manager, get_registry
from diffusers_kit.report import image_grid, scatter_plot
from diffusers_kit.solvers.base import Solver
from diffusers_kit.spec.errors import Path as SpecPath
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document
from diffusers_kit.spec.models import Spec
from diffusers_kit.train import (
    Distributed,
    TrainingDiverged,
    TrainingInterrupted,
    distributed_from_env,
    leave_distributed,
)

STAGES = ("data", "train", "sample", "evaluate", "report")
CHECKPOINT = "checkpoint.safetensors"


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
    solver: Solver
    metrics: list[tuple[str, Metric]]
    optimizer: Any
    resolved: dict[str, Any]


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
        except (ValueError, TypeError) as exc:
            self.issue(path, f"parameters that {config.get('kind')!r} accepts: {exc}", config)
            return None

    def resolve(self, kind: str, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with every default filled in (for the resolved spec in the run folder)."""
        component = self.registry.get(kind, config["kind"])
        plain = {k: v for k, v in config.items() if k != "kind" and k not in component.nested}
        full: dict[str, Any] = {"kind": config["kind"],
                                **component.params.model_validate(plain).model_dump()}
        for key, sub in component.nested.items():
            value = config.get(key)
            if value is None:
                full[key] = None
            elif sub.many:
                full[key] = [self.resolve(sub.kind, item) for item in value]
            else:
                full[key] = self.resolve(sub.kind, value)
        return full


def build_components(
    spec: Spec,
    document: Document | None = None,
    registry: Registry | None = None,
    distributed: Distributed | None = None,
    stages: set[str] | None = None,
) -> Components:
    """Build every component of ``spec`` (loading the data for the network's shape)."""
    registry = registry or get_registry()
    builder = Builder(registry, document)
    device = resolve_device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        builder.issue(("device",), "a device this machine has (no CUDA here; use auto or cpu)",
                      spec.device)
    elif device.type == "cuda" and distributed is not None and distributed.active:
        device = torch.device("cuda", distributed.local_rank)  # one GPU per rank
    if spec.train.precision == "fp16" and device.type != "cuda":
        builder.issue(("train", "precision"), "fp32 or bf16 on this device (fp16 with a "
                      "gradient scaler needs CUDA)", spec.train.precision)
    dataset = builder.build(("data",), "dataset", spec.data)
    process = builder.build(("process",), "process", spec.process)
    objective = builder.build(("objective",), "objective", spec.objective)
    solver = builder.build(("sample", "solver"), "solver", spec.sample.solver)
    optimizer = builder.build(("train", "optimizer"), "optimizer", spec.train.optimizer)
    metrics = [(m["kind"], builder.build(("evaluate", "metrics", i), "metric", m))
               for i, m in enumerate(spec.evaluate.metrics)]
    if solver is not None and process is not None and (reason := solver.check(process)):
        builder.issue(("sample", "solver", "kind"), reason, spec.sample.solver["kind"])
    data = None
    if dataset is not None:
        try:
            data = dataset.load()
        except (OSError, ValueError) as exc:
            builder.issue(("data",), f"a data set that loads ({exc})", spec.data)
    network = None
    if data is not None:
        torch.manual_seed(spec.seed)  # the network's initial weights follow the spec's seed
        network = builder.build(("network",), "network", spec.network, data_shape=data.shape)
    if network is not None and objective is not None and process is not None:
        if reason := objective.check(process, network):
            builder.issue(("objective", "kind"), reason, spec.objective["kind"])
        if network.num_classes is not None and data is not None and (
                data.train_labels is None):
            builder.issue(("network", "num_classes"), "a data set with class labels (this one "
                          "has none); leave num_classes out", network.num_classes)
        if spec.train.compile and objective.differentiates_twice:
            builder.issue(("train", "compile"), f"false with objective {spec.objective['kind']!r}"
                          " (it differentiates twice, which compiled graphs cannot)", True)
        if objective.needs_labels and data is not None and data.train_labels is None:
            builder.issue(("data", "kind"), f"a data set with class labels for objective "
                          f"{spec.objective['kind']!r}", spec.data["kind"])
        if network.prediction == "logits" and stages is not None and "sample" in stages:
            builder.issue(("network", "kind"), "a denoising network to sample from (train a "
                          "classifier with --only train)", spec.network["kind"])
    if builder.issues:
        raise SpecError(builder.issues, document.origin if document else None)
    resolved = spec.model_dump()
    resolved["data"] = builder.resolve("dataset", spec.data)
    resolved["process"] = builder.resolve("process", spec.process)
    resolved["network"] = builder.resolve("network", spec.network)
    resolved["objective"] = builder.resolve("objective", spec.objective)
    resolved["sample"]["solver"] = builder.resolve("solver", spec.sample.solver)
    resolved["train"]["optimizer"] = builder.resolve("optimizer", spec.train.optimizer)
    resolved["evaluate"]["metrics"] = [builder.resolve("metric", m) for m in spec.evaluate.metrics]
    diffusion = Diffusion(process, network, objective, device=device)
    return Components(dataset, data, diffusion, solver, metrics, optimizer, resolved)


def _new_run_dir(root: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / name / stamp
    candidate, suffix = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{stamp}-{suffix}")
        suffix += 1
    candidate.mkdir(parents=True)
    return candidate


@dataclass
class Run:
    """One execution of a spec: its components, its folder and what the stages produced."""

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
    if trainer is not None and trainer.last_checkpoint != trainer.step:
        trainer.checkpoint(save)  # the final state, resumable (e.g. with more steps)
    losses = diffusion.train_log.losses
    run.results["train_loss"] = losses[-1] if losses else float("nan")
    if checkpoint is not None:
        run.log.info("checkpoint written to %s", checkpoint)


def load_previous(diffusion: Diffusion, from_dir: Path) -> int:
    """Load ``from_dir``'s checkpoint into ``diffusion``; a mismatch is a spec error."""
    source = from_dir / CHECKPOINT
    try:
        diffusion.load(source)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        expected = f"a checkpoint whose weights fit this spec's network ({first})"
        issue = SpecIssue(("--from",), expected, str(source), None, "command line")
        raise SpecError([issue]) from None
    return diffusion.step


def _stage_sample(run: Run) -> None:
    spec, diffusion, solver = run.spec, run.diffusion, run.components.solver
    n, size = spec.sample.n, spec.sample.batch_size or spec.sample.n
    batches = -(-n // size)
    with run.progress() as progress:
        task = progress.add_task("sample", total=solver.total_steps(diffusion.process) * batches,
                                 status=spec.sample.solver["kind"])
        result = diffusion.sample(n, solver, seed=spec.seed, batch_size=spec.sample.batch_size,
                                  progress=lambda k: progress.advance(task, k))
    samples = result.samples.float().cpu()
    get_plugin_manager().hook.dkit_samples_ready(run=run, samples=samples)
    run.results["samples"] = samples
    run.results["nfe"] = result.nfe
    np.savez_compressed(run.dir / "samples.npz", samples=samples.numpy(),
                        display=run.components.dataset.to_display(samples).numpy())
    run.log.info("%d samples, %d network evaluations", n, result.nfe)


def _stage_evaluate(run: Run) -> None:
    samples = run.results["samples"]
    generator = torch.Generator().manual_seed(run.spec.seed)
    metrics: dict[str, float] = {}
    with run.diffusion.sampling_weights() as model:
        for _, metric in run.components.metrics:
            metrics.update(metric.evaluate(samples, run.components.data, generator, model))
    run.results["metrics"] = metrics
    for key, value in metrics.items():
        run.log.info("metric %s = %.6g", key, value)


def _stage_report(run: Run) -> None:
    samples = run.results.get("samples")
    dataset = run.components.dataset
    if samples is not None:
        if dataset.modality == "image":
            picture = image_grid(dataset.to_display(samples), run.spec.output.grid_columns)
        else:
            picture = scatter_plot(samples, run.components.data.heldout)
        picture.save(run.dir / "samples.png")
    summary = {k: v for k, v in run.results.items() if k != "samples"}
    summary.update({f"time_{k}_s": round(v, 3) for k, v in run.timings.items()})
    metrics = summary.pop("metrics", {})
    (run.dir / "metrics.json").write_text(json.dumps({**metrics, **summary}, indent=2) + "\n")


GRAPH = (
    Stage("data", (), ("dataset",), _stage_data),
    Stage("train", ("dataset",), ("checkpoint",), _stage_train),
    Stage("sample", ("checkpoint",), ("samples",), _stage_sample),
    Stage("evaluate", ("samples", "dataset"), ("metrics",), _stage_evaluate),
    Stage("report", (), ("samples.png", "metrics.json"), _stage_report),
)


def parse_only(only: str | None) -> set[str]:
    """``"sample,evaluate"`` -> the stage set (data and report always run)."""
    if not only:
        return set(STAGES)
    chosen = {s.strip() for s in only.split(",") if s.strip()}
    unknown = chosen - set(STAGES)
    if unknown:
        raise SpecError([SpecIssue(("--only",), f"stage names from {', '.join(STAGES)}",
                                   ",".join(sorted(unknown)), None, "command line")])
    return chosen | {"data", "report"}


# the spec fields a resumed run may change: how long, how often to log / save, what comes after
RESUMABLE_CHANGES = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every")}
TRAINING_SECTIONS = ("seed", "data", "process", "network", "objective", "train")


def _differences(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if (*path, key) not in RESUMABLE_CHANGES:
                found += _differences(old.get(key), new.get(key), (*path, key))
        return found
    return [] if old == new else [".".join(path)]


def check_resumable(resume_dir: Path, resolved: dict[str, Any], world: int = 1) -> int:
    """The step of ``resume_dir``'s checkpoint, after checking it was trained by this spec."""
    def refuse(expected: str) -> SpecError:
        return SpecError([SpecIssue(("--resume",), expected, str(resume_dir), None,
                                    "command line")])

    if not (resume_dir / CHECKPOINT).is_file():
        raise refuse(f"a run folder holding {CHECKPOINT}")
    try:
        from diffusers_kit.checkpoint import load_metadata

        metadata = load_metadata(resume_dir / CHECKPOINT)
        previous = yaml.safe_load((resume_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise refuse(f"a readable run folder ({exc})") from None
    if "training" not in metadata:
        raise refuse("a checkpoint with training state (this one holds weights only)")
    changed = [d for section in TRAINING_SECTIONS
               for d in _differences(previous.get(section), resolved.get(section), (section,))]
    ranks = int(metadata["training"].get("world", 1))
    if ranks != world:
        raise refuse(f"as many data-parallel ranks as the run was trained with ({ranks}; this "
                     f"run has {world}), so that the data order continues")
    if changed:
        raise refuse("a run of this same spec: only train.steps, train.log_every, "
                     "train.checkpoint_every and the sampling / evaluation sections may change; "
                     f"this spec differs in {', '.join(changed)}")
    return int(metadata["training"]["train_step"])


def execute(
    spec: Spec,
    document: Document | None = None,
    *,
    only: str | None = None,
    from_dir: str | Path | None = None,
    resume: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
) -> Run:
    """Validate-and-build, create the run folder, run the chosen stages; returns the Run.

    ``resume``: continue the killed or finished run in that folder (its checkpoint and spec).
    Under ``torchrun`` every rank trains; only rank 0 creates the folder, writes, samples.
    """
    stages = parse_only(only)
    from_path = Path(from_dir) if from_dir else None
    resume_path = Path(resume) if resume else None
    if resume_path is not None and ("train" not in stages or from_path is not None):
        raise SpecError([SpecIssue(("--resume",), "the train stage, without --from (a resumed "
                                   "run continues training)", str(resume_path), None,
                                   "command line")])
    if "train" not in stages and "sample" in stages:
        if from_path is None:
            raise SpecError([SpecIssue(("--from",), "a run folder to take the checkpoint from "
                                       "when the train stage is skipped", None, None,
                                       "command line")])
        if not (from_path / CHECKPOINT).is_file():
            raise SpecError([SpecIssue(("--from",), f"a run folder holding {CHECKPOINT}",
                                       str(from_path), None, "command line")])
    distributed = distributed_from_env(resolve_device(spec.device).type)
    components = build_components(spec, document, distributed=distributed, stages=stages)
    resume_step = 0
    if resume_path is not None:
        resume_step = check_resumable(resume_path, components.resolved, distributed.world)
    if from_path is not None and "train" not in stages:
        load_previous(components.diffusion, from_path)  # before any folder is created
    console = console or Console(stderr=True)
    if not distributed.main:  # a data-parallel helper: train, write nothing
        run = Run(spec, components, None, console, True, None,
                  resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
        _stage_train(run)
        leave_distributed(distributed)
        return run
    if resume_path is not None:
        run_dir = resume_path
    else:
        run_dir = _new_run_dir(Path(spec.output.root), spec.name)
    run = Run(spec, components, run_dir, console, quiet, from_path,
              resume_path / CHECKPOINT if resume_path else None, resume_step, distributed)
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
        if distributed.active:
            run.log.info("data parallel over %d ranks", distributed.world)
        if not quiet:
            console.print(f"network: {network.describe()}")
        if from_path is not None and "train" not in stages:
            run.log.info("weights loaded from %s (step %d)", from_path / CHECKPOINT,
                         components.diffusion.step)
        get_plugin_manager().hook.dkit_run_started(run=run)
        for stage in GRAPH:
            if stage.name not in stages:
                continue
            started = time.perf_counter()
            stage.run(run)
            run.timings[stage.name] = time.perf_counter() - started
        get_plugin_manager().hook.dkit_run_finished(run=run,
                                                     metrics=run.results.get("metrics", {}))
        leave_distributed(distributed)
    finally:
        run.log.removeHandler(handler)
        handler.close()
    return run


def summary_table(run: Run) -> Table:
    """A rich table of the run: where it is, how long each stage took, the metrics."""
    table = Table(title=f"dkit run {run.spec.name}", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("device", str(run.diffusion.device))
    table.add_row("parameters", f"{run.diffusion.network.parameter_count():,}")
    for stage, seconds in run.timings.items():
        table.add_row(f"{stage} time", f"{seconds:.1f} s")
    if "train_loss" in run.results:
        table.add_row("final train loss", f"{run.results['train_loss']:.4f}")
    if "nfe" in run.results:
        table.add_row("network evaluations", str(run.results["nfe"]))
    for key, value in run.results.get("metrics", {}).items():
        table.add_row(key, f"{value:.4g}")
    return table

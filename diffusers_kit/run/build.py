"""Building a run's components from a validated spec, with every check between them.

Every component is built (and every spec problem reported) before a run folder is created, so
a broken spec never leaves a half-written folder behind: the components are checked against
each other (a solver against the process, an objective against the network, guidance and
restoration terms against the model, labels against the classes) and, on request, every metric
is tried at the run's sizes (:func:`check_metric_sizes`). ``dkit validate`` runs exactly this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.devices import is_out_of_memory
from diffusers_kit.diffusion import (
    Diffusion,
    resolve_device,
)
from diffusers_kit.guidance.base import Guidance, LabelsError, requested_labels
from diffusers_kit.hookspecs import OptionError
from diffusers_kit.metrics.base import Metric, metric_figures
from diffusers_kit.metrics.floor import ErrorBars
from diffusers_kit.model import expected_output_shape
from diffusers_kit.references import TrainedModel
from diffusers_kit.registry import (
    NestedBuildError,
    Registry,
    get_registry,
)
from diffusers_kit.run.resume import load_previous
from diffusers_kit.run_folder import (
    CHECKPOINT,
    SPEC_FILE,
    follow_latest,
    newest_run,
)
from diffusers_kit.solvers.base import Solver, solver_needed
from diffusers_kit.spec.errors import Path as SpecPath
from diffusers_kit.spec.errors import SpecError, SpecIssue, dotted
from diffusers_kit.spec.loader import Document, apply_overrides, component_option, load_file
from diffusers_kit.spec.models import Spec
from diffusers_kit.spec.references import (
    resolve_spec,
)
from diffusers_kit.spec.validate import validate
from diffusers_kit.train import (
    Distributed,
)

if TYPE_CHECKING:
    from diffusers_kit.processes.base import NoiseProcess


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
    trackers: list[Any] = field(default_factory=list)  # spec.track, built (diffusers_kit.tracking)


class ComponentBuildError(RuntimeError):
    """A component's constructor failed in a way no parameter explains (a bug in it, or in the
    plugin that registered it): named with its spec field, kind, name and class."""


class Builder:
    """Builds components from spec sections, turning construction errors into spec issues."""

    def __init__(self, registry: Registry, document: Document | None) -> None:
        self.registry = registry
        self.document = document
        self.issues: list[SpecIssue] = []

    def issue(self, path: SpecPath, expected: str, given: Any) -> None:
        line, origin = self.document.locate(path) if self.document else (None, None)
        self.issues.append(SpecIssue(path, expected, given, line, origin))

    def refused(self, path: SpecPath, config: Any, error: Exception) -> None:
        """The issue of a constructor that refused ``config`` (at ``path``): on the option an
        :class:`~diffusers_kit.hookspecs.OptionError` names, else on the whole mapping."""
        name = config.get("kind") if isinstance(config, dict) else None
        if isinstance(error, OptionError) and isinstance(config, dict) and error.option in config:
            self.issue((*path, error.option), f"{error.expected} ({name!r})",
                       config[error.option])
        else:
            self.issue(path, f"parameters that {name!r} accepts: {error}", config)

    def check_solver(self, path: SpecPath, solver: Solver, process: NoiseProcess,
                     config: dict[str, Any]) -> None:
        """The issue of a ``solver`` (built from ``config`` at ``path``) that cannot sample
        ``process``: on the option an :class:`~diffusers_kit.solvers.base.Unsuited` answer
        names, else on ``kind``."""
        if reason := solver.check(process):
            option = getattr(reason, "option", "kind")
            self.issue((*path, option), reason, config.get(option))

    def build(self, path: SpecPath, kind: str, config: dict[str, Any], **context: Any) -> Any:
        try:
            return self.registry.build(kind, config, **context)
        except NestedBuildError as exc:  # name the nested component that failed, not its parent
            self.refused(path + exc.path, exc.config, exc.error)
            return None
        except (ValueError, TypeError) as exc:
            self.refused(path, config, exc)
            return None
        except (OSError, MemoryError, ArithmeticError, LookupError, RuntimeError,
                AttributeError, AssertionError, NotImplementedError) as exc:
            if isinstance(exc, (OSError, MemoryError)) or is_out_of_memory(exc):
                raise  # the environment: reported as such
            try:
                factory = self.registry.get(kind, config.get("kind")).factory
                where = f"{factory.__module__}.{getattr(factory, '__qualname__', factory)}"
            except (KeyError, ValueError, TypeError, AttributeError):
                where = "unknown"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ComponentBuildError(
                f"{dotted(path)}: the {kind} {config.get('kind')!r} ({where}) raised "
                f"{type(exc).__name__} while being built: {first}") from exc

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
    if solver is not None and process is not None:
        builder.check_solver(("sample", "solver"), solver, process, spec.sample.solver)
    data = None
    if dataset is not None:
        try:
            data = dataset.load()
        except (OSError, ValueError) as exc:
            model_builder.issue(("data",), f"a data set that loads ({exc})", source.data)
    shape = {} if data is None else {"data_shape": data.shape}  # for nested operators
    metrics = [(m["kind"], builder.build(("evaluate", "metrics", i), "metric", m, **shape))
               for i, m in enumerate(spec.evaluate.metrics)]
    trackers = [builder.build(("track", i), "tracker", t) for i, t in enumerate(spec.track)]
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
        if network is not None and (reason := _network_output_refusal(network, shape, process)):
            model_builder.issue(("network", "kind"), reason, source.network["kind"])
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
        check_metric_sizes(spec, builder, data, labels)
        if builder.issues:
            raise SpecError(builder.issues, document.origin if document else None)
    return Components(dataset, data, diffusion, solver, metrics, optimizer, resolved, guidance,
                      labels, method, restore_solver, trackers)


def _network_output_refusal(network: Any, data_shape: tuple[int, ...], process: Any
                            ) -> str | None:
    """Why ``network`` cannot serve data of ``data_shape``, found by one evaluation of a batch
    of two (evaluation mode, no gradient, so no random number and no batch statistic changes),
    or None. A plugin network whose output has another shape (a (B, 1) output for (B, 2) data
    broadcasts through losses and solver steps) or that fails on its own input is refused here,
    before any training."""
    expected = expected_output_shape(network, (2, *data_shape))
    if expected is None:
        return None
    if hasattr(network, "bind_process"):  # a wrapper set by the process (edm_precond)
        if process is None:
            return None
        network.bind_process(process)  # as ScoreModel will
    x = torch.zeros(expected[:1] + tuple(data_shape))
    t = torch.full((2,), 0.5)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = (network(x, t, torch.zeros(2, dtype=torch.long))
                   if getattr(network, "num_classes", None) is not None else network(x, t))
    except Exception as exc:  # a plugin's forward: report it with the network's name
        return (f"a network that evaluates a batch of shape {tuple(x.shape)} "
                f"({type(network).__qualname__} raised {type(exc).__name__}: {exc})")
    finally:
        network.train(was_training)
    shape = tuple(getattr(out, "shape", ()))
    if shape != expected:
        per = ("twice the channels: it learns its variance" if network.learned_variance
               else "one value per input element")
        return (f"a network returning shape {expected} for input {tuple(x.shape)} ({per}); "
                f"{type(network).__qualname__} returned {shape}")
    return None


def _first_stage(reference: TrainedModel, data_shape: tuple[int, ...], builder: Builder
                 ) -> Autoencoder | None:
    """The trained autoencoder ``latent`` names (its sampling weights, frozen), checked against
    the images of this spec's data set; None (with the issue recorded) when it does not fit.

    A reference not built yet (``dkit validate``, the checks before a dependency is trained)
    gives the autoencoder its spec describes, untrained: enough to check shapes
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
                          "diffpir, ddnm, ddnm_plus, pigdm, dps, ddrm, or a plugin's measurement "
                          "term)", section.method["kind"])
        elif (reason := method.check(diffusion.model)) is not None:
            builder.issue(("restore", "method", "kind"), reason, section.method["kind"])
    chosen = solver
    if section.solver is not None:
        chosen = builder.build(("restore", "solver"), "solver", section.solver)
        if chosen is not None:
            builder.check_solver(("restore", "solver"), chosen, diffusion.process,
                                 section.solver)
    elif chosen is None:
        builder.issue(("restore", "solver"), "a solver (here or in the sample section)", None)
    if (method is not None and chosen is not None and getattr(method, "takes_step", False)
            and not chosen.takes_term_steps):
        where = ("restore", "solver", "kind") if section.solver is not None else \
            ("restore", "solver")
        builder.issue(where, solver_needed(method),
                      section.solver["kind"] if section.solver is not None else
                      type(chosen).__name__)
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
        if classes is None and spec.sample.labels is not None and not any(
                term.needs_labels for term in guidance):
            # nothing would read them, yet samples.npz would record them as requested classes
            builder.issue(("sample", "labels"), "no labels: this model is unconditional (no "
                          "network.num_classes) and no guidance term uses classes",
                          spec.sample.labels)
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


class ModelNeeded(Exception):
    """A metric asked for the trained model during the size check (:class:`_NoModel`)."""


class _NoModel:
    """The trained model's stand-in in :func:`check_metric_sizes`: a metric that uses it judges
    the model rather than the samples (a likelihood of held-out data), which only the trained
    model can answer; touching it ends that metric's check."""

    def __getattr__(self, name: str) -> Any:
        raise ModelNeeded(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelNeeded("__call__")


#: the sample count a metric is first tried at (:func:`check_metric_sizes`)
PROBE_SAMPLES = 32
PROBE_RESAMPLES = 2  # the fewest resampling draws that run an interval's code


def check_metric_sizes(spec: Spec, builder: Builder, data: DataSplits,
                       labels: torch.Tensor | None) -> None:
    """Try every metric that judges samples on stand-in samples (training examples, slightly
    perturbed so that no two coincide) against this data set, with the run's seed, so that a
    metric needing more samples or held-out examples than the run will have (PRDC's k nearest
    neighbours, a bootstrap's distinct draws) is refused before training. What such a metric
    refuses depends on the sizes and the seed, not on the values, so the refusal is the one
    the run would meet. A model reference not built yet stands in untrained (built from its
    spec). Each refusal is an issue naming the metric and ``sample.n``. A metric that uses the
    trained model itself (a likelihood) is left to the evaluation after training.

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
        bars = getattr(metric, "bars", None)
        if isinstance(bars, ErrorBars) and bars.resamples > PROBE_RESAMPLES:
            # what a metric refuses depends on the sizes, not on how many resampling draws
            # its interval takes: the fewest that run the interval's code keep the check fast
            metric.bars = replace(bars, resamples=PROBE_RESAMPLES)
        refusal: SpecError | ValueError | None = None
        for count in dict.fromkeys((min(n, PROBE_SAMPLES), n)):
            chosen = torch.linspace(0, n - 1, count).round().long()
            generator = torch.Generator().manual_seed(spec.seed)
            try:
                with torch.random.fork_rng(devices=[]):
                    metric_figures(metric, samples[chosen], data, generator, _NoModel(),
                                   None if labels is None else labels[chosen])
            except (SpecError, ValueError) as exc:
                refusal = exc
                continue
            except (ModelNeeded, TypeError, AttributeError):
                pass  # it judges the trained model (a likelihood): checked when it exists
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


def run_document(run_dir: str | Path) -> tuple[Path, Document]:
    """A finished run's folder (``RUN_DIR/../latest`` followed) and its resolved spec as a
    document; a spec error naming RUN_DIR when the folder lacks its spec or checkpoint."""
    folder = follow_latest(Path(run_dir).expanduser())
    if not (folder / SPEC_FILE).is_file() or not (folder / CHECKPOINT).is_file():
        raise SpecError([SpecIssue(("RUN_DIR",), f"a run folder holding {SPEC_FILE} and "
                                   f"{CHECKPOINT} (relative to the working directory "
                                   f"{Path.cwd()})", str(run_dir), None, "command line",
                                   newest_run(Path(run_dir).expanduser()))])
    return folder, load_file(folder / SPEC_FILE)


def set_option(document: Document, path: SpecPath, value: Any, option: str) -> None:
    """Set the field at ``path`` of ``document`` to ``value`` (a command-line option's value,
    already parsed: no text round trip); its problems are blamed on ``option``."""
    target = document.data
    for part in path[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[path[-1]] = value
    document.overridden[path] = option


def open_run(run_dir: str | Path, overrides: list[str] | None = None,
             solver: str | None = None,
             options: Callable[[Document], None] | None = None) -> tuple[Spec, Components]:
    """Rebuild a finished run's components from its resolved ``spec.yaml`` and load its
    checkpoint. ``RUN_DIR/../latest`` is followed; ``solver`` (a registered name or a YAML
    mapping) replaces its solver; ``options`` sets a command's options in the document
    (:func:`set_option`); ``overrides`` then change fields of that spec."""
    folder, document = run_document(run_dir)
    if solver is not None:
        value = component_option("--solver", solver, "a solver name or a YAML mapping such as "
                                 "'{kind: ddim, steps: 20}'")
        set_option(document, ("sample", "solver"), value, f"--solver {solver}")
    if options is not None:
        options(document)
    if overrides:
        refuse_model_changes(overrides)
        apply_overrides(document, overrides)
    spec = validate(document, get_registry())
    components = build_components(spec, document)
    load_previous(components.diffusion, folder, "RUN_DIR")
    sampling_ema(spec, components.diffusion, document)
    return spec, components


def sampling_ema(spec: Spec, diffusion: Diffusion, document: Document | None = None
                 ) -> float | None:
    """With ``sample.ema_sigma_rel`` set, make the sampling weights the post-hoc EMA of that
    width (:meth:`Diffusion.use_post_hoc_ema`) and return the reconstruction's relative profile
    error; a model without snapshots is a spec error naming the field. None when unset."""
    sigma_rel = spec.sample.ema_sigma_rel if spec.sample is not None else None
    if sigma_rel is None:
        return None
    try:
        return diffusion.use_post_hoc_ema(sigma_rel)
    except ValueError as exc:
        path = ("sample", "ema_sigma_rel")
        line, origin = document.locate(path) if document is not None else (None, None)
        raise SpecError([SpecIssue(path, str(exc), sigma_rel, line, origin)]) from None


#: the sections that say what a trained model is: changing one on a finished run's weights
#: (dkit sample / sweep / restore) would report a model that was never trained
MODEL_SECTIONS = ("data", "autoencoder", "latent", "process", "network", "objective")


def refuse_model_changes(overrides: list[str]) -> None:
    """A spec error for each override of ``overrides`` that changes what the trained weights
    mean (:data:`MODEL_SECTIONS`): their results would describe a model nobody trained."""
    issues = []
    for text in overrides:
        field = text.split("=", 1)[0].strip()
        if field.split(".")[0] in MODEL_SECTIONS:
            issues.append(SpecIssue(tuple(field.split(".")), "no change to what the trained "
                                    "model is (data, autoencoder, latent, process, network, "
                                    "objective): the weights were trained with the run's own; "
                                    "train a model with the change (dkit run SPEC "
                                    f"{field}=..., --from RUN_DIR to start from these weights)",
                                    text.split("=", 1)[-1], None, "command line"))
    if issues:
        raise SpecError(issues)

"""Samplers and solvers (kind ``solver``): the base class, its one driver, the result.

:meth:`Solver.sample` owns what every sampler needs and no algorithm should repeat (the start,
the random stream, the cached grid, counting network evaluations, progress, recording); a solver
is its :meth:`Solver.grid` and :meth:`Solver.run` (k-diffusion's shape). Recording is one option
every solver takes, ``record`` (a :class:`Record`: ``{what: [x, x0], snapshots: 10}`` in a
spec), declared here (:data:`RECORDING_OPTIONS`) and never by a solver; the old names
``keep_trajectory``, ``keep_x0`` and ``snapshots`` still work and warn.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, cast

import numpy as np
import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.solvers.noise import Noise, as_noise

if TYPE_CHECKING:
    from PIL import Image

    from diffusers_kit.data.base import Dataset
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.processes.base import NoiseProcess

#: A solver's grid: whatever typed, cached object its :meth:`Solver.grid` builds (it has ``t``).
Grid = Any
Progress = Callable[[int], None]

#: The most samples a grid picture shows (``samples.png``): a grid of 200,000 digits is 22,400
#: pixels wide, too large to look at; ``samples.npz`` holds them all.
GRID_LIMIT = 4096


@dataclass(frozen=True)
class Record:
    """What a sampler keeps while it runs: ``x`` (the state) and / or ``x0`` (its denoised
    estimate), each at ``snapshots`` evenly spaced steps (the first and the last included)."""

    what: tuple[Literal["x", "x0"], ...] = ("x", "x0")
    snapshots: Annotated[int, Field(ge=1, le=10_000)] = 10


@dataclass
class SampleResult:
    """Samples plus what the sampler measured.

    ``nfe``: network evaluations; ``trajectory``: ``x`` at the recorded steps;
    ``x0_predictions``: the denoised estimates ``x0_hat`` at the same steps (a progressive-
    generation figure, Ho et al. 2020, fig. 6); ``times``: the process time of each record;
    ``labels``: the requested class of each sample (None when none were requested);
    ``latents``: for a latent diffusion model, the samples in latent space (``samples``,
    ``trajectory`` and ``x0_predictions`` are then decoded images).
    """

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] = field(default_factory=list)
    x0_predictions: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    labels: torch.Tensor | None = None  # the class of each sample, when labels were requested
    batch_size: int | None = None  # the most samples drawn at once (set by Diffusion.sample)
    latents: torch.Tensor | None = None  # a latent model's samples before decoding

    # -- what dkit run / dkit sample write, for a notebook ----------------------------------
    def display(self, dataset: Dataset | None = None) -> torch.Tensor:
        """The samples on the CPU in display space: ``dataset.to_display`` (``[0, 1]`` for
        images); without a data set, images (``(N, C, H, W)``) are taken to lie in
        ``[-1, 1]``, the built-in image data sets' range, and vectors are left as they are."""
        samples = self.samples.detach().float().cpu()
        if dataset is not None:
            return dataset.to_display(samples)
        return ((samples + 1) / 2).clamp(0, 1) if samples.dim() == 4 else samples

    def picture(self, dataset: Dataset | None = None, columns: int | None = None, *,
                reference: torch.Tensor | DataSplits | None = None,
                limit: int | None = GRID_LIMIT) -> Image.Image:
        """The picture ``dkit run`` saves as ``samples.png`` (a PIL image; a notebook shows it
        inline): an image grid of the first ``limit`` samples (None: all), one row per class
        when labels were drawn in blocks (``columns`` overrides, as ``output.grid_columns``), or
        for vectors a scatter plot over ``reference`` (held-out data; by default ``dataset``'s)."""
        from diffusers_kit.report import columns_per_class, image_grid, scatter_plot

        image = (dataset.modality == "image" if dataset is not None
                 else self.samples.dim() == 4)
        if image:
            shown = self.display(dataset)[:limit]
            labels = None if self.labels is None else self.labels[:limit]
            return image_grid(shown, columns or columns_per_class(labels))
        if isinstance(reference, DataSplits):
            reference = reference.heldout
        elif reference is None and dataset is not None:
            reference = dataset.load().heldout
        return scatter_plot(self.samples.detach().float().cpu(), reference)

    def save_grid(self, path: str | Path, dataset: Dataset | None = None,
                  columns: int | None = None, *,
                  reference: torch.Tensor | DataSplits | None = None,
                  limit: int | None = GRID_LIMIT) -> Path:
        """Write :meth:`picture` to ``path`` (PNG by its suffix); returns the path."""
        path = Path(path).expanduser()
        self.picture(dataset, columns, reference=reference, limit=limit).save(path)
        return path

    def save(self, folder: str | Path, dataset: Dataset | None = None, *,
             columns: int | None = None, reference: torch.Tensor | DataSplits | None = None,
             metrics: Mapping[str, Any] | None = None, stem: str = "samples",
             limit: int | None = GRID_LIMIT) -> Path:
        """Write what a run writes, into ``folder`` (created when missing): ``<stem>.npz``
        (``samples``, ``display`` and, when labels were drawn, ``labels``; what ``dkit
        evaluate --samples`` reads), ``<stem>.png`` (:meth:`picture`) and, with ``metrics``
        (e.g. from :meth:`Diffusion.evaluate <diffusers_kit.diffusion.Diffusion.evaluate>`),
        ``metrics.json`` (NaN and infinity written as null). Returns the folder."""
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"samples": self.samples.detach().float().cpu().numpy(),
                  "display": self.display(dataset).numpy()}
        if self.labels is not None:
            arrays["labels"] = self.labels.cpu().numpy()
        np.savez_compressed(folder / f"{stem}.npz", **arrays)
        self.save_grid(folder / f"{stem}.png", dataset, columns, reference=reference,
                       limit=limit)
        if metrics is not None:
            finite = json.loads(json.dumps(dict(metrics), default=float),
                                parse_constant=lambda _: None)
            (folder / "metrics.json").write_text(
                json.dumps(finite, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return folder


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a parameter-free model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class Recorder:
    """Keeps ``x`` and / or ``x0_hat`` at ``record.snapshots`` evenly spaced steps of ``steps``
    (``times``: the process time of each step).

    The steps to record are chosen once, on the host; :meth:`wants` is a set lookup, so a loop
    that asks for nothing pays nothing and stores nothing. A step recorded again replaces its
    first record (RePaint descends a step several times: the last descent is kept). The 0.1
    keywords ``trajectory`` / ``x0`` / ``snapshots`` still build one.
    """

    def __init__(self, steps: int, record: Record | None = None, times: Sequence[float] = (),
                 *, trajectory: bool = False, x0: bool = False, snapshots: int = 10) -> None:
        if record is None and (trajectory or x0):
            record = Record(what=cast(Any, ("x",) * trajectory + ("x0",) * x0),
                            snapshots=snapshots)
        what = record.what if record is not None else ()
        self.keep_trajectory, self.keep_x0 = "x" in what, "x0" in what
        self._times = list(times)
        self._kept: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.marks: set[int] = set()
        if record is not None and what and steps > 0:
            count = max(1, min(record.snapshots, steps))
            self.marks = {round(k * (steps - 1) / max(count - 1, 1)) for k in range(count)}

    def wants(self, step: int) -> bool:
        return step in self.marks

    def record(self, step: int, x: torch.Tensor, x0: torch.Tensor | None = None) -> None:
        """Keep ``x`` and ``x0`` at ``step`` when it is one to keep."""
        if step not in self.marks:
            return
        self._kept[step] = (x.detach().clone() if self.keep_trajectory else None,
                            x0.detach().clone() if self.keep_x0 and x0 is not None else None)

    @property
    def trajectory(self) -> list[torch.Tensor]:
        return [x for _, (x, _) in sorted(self._kept.items()) if x is not None]

    @property
    def x0(self) -> list[torch.Tensor]:
        return [x0 for _, (_, x0) in sorted(self._kept.items()) if x0 is not None]

    @property
    def times(self) -> list[float]:
        return [self._times[i] if i < len(self._times) else float("nan")
                for i in sorted(self._kept)]

    def result(self, samples: torch.Tensor, nfe: int) -> SampleResult:
        return SampleResult(samples, nfe, self.trajectory, self.x0, self.times)


class Callback:
    """What a solver's :meth:`Solver.run` calls at each step: ``callback(i, x, denoised)``
    with the grid index ``i`` of the step, the state ``x`` there and the denoised estimate
    ``x0_hat(x)`` (None when there is none). Each call is one progress unit
    (:meth:`Solver.total_steps` counts the calls). A solver that must do work to form
    ``denoised`` asks :meth:`wants` first."""

    def __init__(self, recorder: Recorder, progress: Progress | None) -> None:
        self.recorder, self.progress = recorder, progress
        self.x0_marks = recorder.marks if recorder.keep_x0 else set()

    def wants(self, i: int) -> bool:
        """Whether ``denoised`` at step ``i`` is kept."""
        return i in self.x0_marks

    def __call__(self, i: int, x: torch.Tensor, denoised: torch.Tensor | None = None) -> None:
        if i in self.recorder.marks:
            self.recorder.record(i, x, denoised)
        if self.progress is not None:
            self.progress(1)


def merge_legacy_recording(record: Record | None, keep_trajectory: bool | None,
                           keep_x0: bool | None, snapshots: int | None) -> Record | None:
    """``record`` from the deprecated ``keep_trajectory`` / ``keep_x0`` / ``snapshots``."""
    if keep_trajectory is None and keep_x0 is None and snapshots is None:
        return record
    warnings.warn("keep_trajectory, keep_x0 and snapshots are deprecated: use "
                  "record: {what: [x, x0], snapshots: N}", DeprecationWarning, stacklevel=3)
    if record is not None:
        raise ValueError("give either record or the deprecated keep_trajectory / keep_x0 / "
                         "snapshots, not both")
    what = tuple(name for name, keep in (("x", keep_trajectory), ("x0", keep_x0)) if keep)
    if not what:
        return None
    return Record(what=cast(Any, what), snapshots=10 if snapshots is None else snapshots)


#: The recording options every solver takes besides its constructor's own: the registry adds
#: them to each solver's schema (a solver's ``dkit_options``) and :meth:`Solver.__init_subclass__`
#: accepts them at construction, so no solver declares them. A solver whose constructor declares
#: one itself (the 0.1 shape: its own ``keep_trajectory``, ``keep_x0``, ``snapshots``) keeps it.
RECORDING_OPTIONS: dict[str, Any] = {
    "record": Record | None,
    "keep_trajectory": bool | None,
    "keep_x0": bool | None,
    "snapshots": Annotated[int, Field(ge=1, le=10_000)] | None,
}


def _accepting_options(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that also accepts the :data:`RECORDING_OPTIONS` it does not declare itself,
    and sets ``record`` from them after it ran. Its signature (the solver's schema) is
    ``init``'s own: nothing is rewritten."""
    own = set(inspect.signature(init).parameters)
    extra = [name for name in RECORDING_OPTIONS if name not in own]

    @functools.wraps(init)
    def wrapper(self: Solver, *args: object, **kwargs: object) -> None:
        given: dict[str, Any] = {name: kwargs.pop(name) for name in extra if name in kwargs}
        init(self, *args, **kwargs)
        if given:
            record = given.get("record")
            if isinstance(record, dict):
                record = Record(**record)
            self.record = merge_legacy_recording(record, given.get("keep_trajectory"),
                                                 given.get("keep_x0"), given.get("snapshots"))

    setattr(wrapper, "__dkit_options__", True)  # noqa: B010  (a marker on a function)
    return wrapper


S = TypeVar("S", bound=type)


def options(cls: S) -> S:
    """A solver whose constructor is its annotated fields, in order (a dataclass compared by
    identity, with the default repr), that accepts the :data:`RECORDING_OPTIONS` too."""
    cls = dataclass(eq=False, repr=False)(cls)
    setattr(cls, "__init__", _accepting_options(cls.__init__))  # noqa: B010
    return cls


class Solver:
    """Base class of samplers: draw ``shape`` samples from a trained :class:`ScoreModel`.

    ``progress(k)`` is called as work advances; ``total_steps`` says how many units there are.
    ``noise`` (a :class:`~diffusers_kit.solvers.noise.Noise`) replaces ``generator`` as the
    source of every random draw; ``x_T`` is the starting point (default: drawn from the prior).

    ``samples_from`` says what model the solver samples: ``diffusion`` (a model of the noised
    data's score / ``x0_hat``; every built-in solver but one) or ``consistency`` (a consistency
    function, whose ``x0`` prediction is the start of the probability-flow trajectory: the
    ``consistency`` solver). The testing kit checks each against the exact model of its kind.

    Options (parameters of the subclasses that take them; the schema reads them from here):
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] before each step (images in [-1, 1]:
            1.0; :func:`~diffusers_kit.solvers.base.clip_data`). None: off.
    """

    samples_from: ClassVar[str] = "diffusion"
    record: Record | None = None
    dkit_options: ClassVar[dict[str, Any]] = RECORDING_OPTIONS
    takes_term_steps: ClassVar[bool] = False
    """Whether :meth:`run` asks a guidance term that ``takes_step`` (DDRM) for its moves
    (:func:`stepping_term`); :meth:`sample` refuses such a term for a solver that does not."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, "__dkit_options__"):
            setattr(cls, "__init__", _accepting_options(init))  # noqa: B010

    # the old attribute names, kept for callers that set them (e.g. ``--progressive``)
    @property
    def keep_x0(self) -> bool:
        return self.record is not None and "x0" in self.record.what

    @keep_x0.setter
    def keep_x0(self, value: bool) -> None:
        self._set_recorded("x0", value)

    @property
    def keep_trajectory(self) -> bool:
        return self.record is not None and "x" in self.record.what

    @keep_trajectory.setter
    def keep_trajectory(self, value: bool) -> None:
        self._set_recorded("x", value)

    def _set_recorded(self, name: str, value: bool) -> None:
        current = self.record or Record(what=())
        what = tuple(w for w in current.what if w != name) + ((name,) if value else ())
        self.record = Record(what=cast(Any, what), snapshots=current.snapshots) if what else None

    def check(self, process: NoiseProcess) -> str | None:
        """Return why this solver cannot sample ``process``, or ``None`` if it can (e.g. a
        sampler that needs discrete noise levels); the run graph reports it as a spec error
        on ``sample.solver.kind`` before anything is trained, or on the option an
        :class:`Unsuited` answer names."""
        return None

    def settings(self) -> tuple:
        """What this solver's grid depends on: its class and its settings (every attribute but
        ``record``; lists and mappings as tuples), the key its :meth:`grid` is cached under."""
        return (type(self), *sorted((k, _hashable(v)) for k, v in vars(self).items()
                                    if k != "record"))

    def grid(self, process: NoiseProcess) -> Grid:
        """Build the grid :meth:`run` walks on ``process`` (times and every per-step
        coefficient, in float64 on the host): called once per (process, :meth:`settings`),
        through :meth:`cached_grid`. It must have ``t``, the process time of each grid point
        (what recorded steps are labelled with: ``t[i]`` for step ``i``)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither grid nor sample")

    def cached_grid(self, process: NoiseProcess) -> Grid:
        from diffusers_kit.solvers.grids import cached

        return cached(process, ("solver", *self.settings()), lambda: self.grid(process))

    def total_steps(self, process: NoiseProcess) -> int:
        """How many progress units one :meth:`sample` call reports (the progress bar's total
        per batch): the number of ``callback`` calls of :meth:`run`; by default one per grid
        step. A solver that overrides :meth:`sample` itself calls ``progress(k)`` as ``k`` of
        them end (1 by default)."""
        if type(self).run is Solver.run:
            return 1
        return len(self.cached_grid(process).t) - 1

    def initial(self, model: ScoreModel, shape: tuple[int, ...], noise: Noise,
                x_T: torch.Tensor | None) -> torch.Tensor:
        """The start :meth:`sample` hands :meth:`run`: :func:`start` (``x_T``, or a prior
        draw); a solver that starts elsewhere (Langevin from ``N(0, init_std^2)``) says so."""
        return start(model, shape, noise, x_T)

    def run(self, model: ScoreModel, x: torch.Tensor, grid: Grid, noise: Noise,
            callback: Callback) -> torch.Tensor:
        """The algorithm: from the start ``x`` walk ``grid`` (:meth:`grid`'s, cached) and return
        the samples. Ask ``model.predict(x, t, "x0" | "eps" | "score")`` for the model's views
        (guidance and parameterisation live there); draw every random number from ``noise``
        (``noise.randn_like(x)``); call ``callback(i, x, denoised)`` once per step. The
        caller (:meth:`sample`) owns the rest."""
        raise NotImplementedError(f"{type(self).__name__} defines neither run nor sample")

    @torch.no_grad()
    def sample(
        self,
        model: ScoreModel,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        noise: Noise | None = None,
        x_T: torch.Tensor | None = None,
    ) -> SampleResult:
        """Draw ``shape[0]`` samples from ``model`` (a :class:`~diffusers_kit.model.ScoreModel`,
        possibly a guided view): the one driver of every solver that defines :meth:`run`. It
        owns the start (:func:`start`), the random stream (``noise``, or ``generator``'s
        draws), the cached grid, the count of network evaluations, progress (one unit per
        ``callback`` call) and recording (a :class:`Recorder` behind the :class:`Callback`).
        A solver written for dkit 1.0 overrides this method and does those chores by hand."""
        term = stepping_term(model)
        if term is not None and not self.takes_term_steps:
            raise ValueError(f"{solver_needed(term)}; {type(self).__name__} takes its own")
        grid = self.cached_grid(model.process)
        noise = as_noise(generator, noise)
        x = self.initial(model, shape, noise, x_T)
        recorder = Recorder(len(grid.t) - 1, self.record, grid.t)
        begin = model.nfe
        x = self.run(model, x, grid, noise, Callback(recorder, progress))
        return recorder.result(x, model.nfe - begin)


def stepping_term(model: ScoreModel) -> Any:
    """The guidance term of ``model`` that takes the sampler's steps itself (its
    ``takes_step``: DDRM), or None; two such terms cannot share one sampler."""
    terms = [term for term in getattr(model, "guidance", ()) if getattr(term, "takes_step",
                                                                        False)]
    if len(terms) > 1:
        raise ValueError(f"one guidance term at most may take the sampler's steps; given "
                         f"{', '.join(type(term).__name__ for term in terms)}")
    return terms[0] if terms else None


def solver_needed(term: Any) -> str:
    """What a step-taking term needs, for refusals."""
    return (f"{type(term).__name__} takes the sampler's steps itself (a sampler in the "
            "operator's SVD basis): use a solver that lets it (ddim)")


class Unsuited(str):
    """A :meth:`Solver.check` answer about one of the solver's options: the text, and the
    ``option`` a spec error points at (a plain string points at ``kind``)."""

    option: str

    def __new__(cls, text: str, option: str) -> Unsuited:
        answer = super().__new__(cls, text)
        answer.option = option
        return answer


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


#: The type of every solver's ``clip_x0`` option (``None``: off).
ClipX0 = Annotated[float, Field(gt=0, le=1e6)] | None
Steps = Annotated[int, Field(ge=1, le=100_000)]
"""A number of solver steps."""
Rho = Annotated[float, Field(gt=0, le=100)]
"""The exponent of the ``edm`` and ``power`` spacings."""
Times = list[Annotated[float, Field(gt=0, le=1)]] | None
"""A solver's own evaluation times (decreasing from 1), in place of its spacing's."""


def clip_data(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    """The data prediction ``x0_hat`` clamped to ``[-clip, clip]`` (``clip`` None: ``x0``
    itself; else a new tensor): the ``clip_x0`` option of every solver that forms ``x0_hat``,
    applied here and nowhere else. DPM-Solver++'s static thresholding of the data prediction
    for pixel-space models (Lu et al. 2022; Ho et al. 2020's clipping; docs/solvers.md)."""
    return x0 if clip is None else x0.clamp(-clip, clip)


def start(model: ScoreModel, shape: tuple[int, ...], noise: Noise,
          x_T: torch.Tensor | None, *, device: torch.device | None = None) -> torch.Tensor:
    """The starting state: ``x_T`` when given (checked against ``shape``), else a prior draw
    (float32); on ``device`` (default: the model's). A float64 ``x_T`` stays float64 and the
    run with it (every state, grid scalar and time the model sees); any other dtype becomes
    float32."""
    if device is None:
        device = model_device(model)
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected {tuple(shape)}")
        dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
        return x_T.to(device=device, dtype=dtype)
    draw = noise.randn(shape, device=device)
    std = model.process.prior_std()
    return draw if std == 1.0 else std * draw


__all__ = ["GRID_LIMIT", "ClipX0", "Noise", "Progress", "Record", "Recorder", "SampleResult",
           "Solver", "Unsuited", "as_noise", "clip_data", "model_device", "solver_needed", "start",
           "stepping_term"]

"""The Python API: compose a process, a network and an objective; fit; sample; evaluate; save.

>>> import torch
>>> from diffusers_kit import VE, NCSN, DenoisingScoreMatching, AnnealedLangevin, Digits, Diffusion
>>> torch.manual_seed(0)                                   # seeds the network's initial weights
>>> model = Diffusion(VE(sigma_max=8.0), NCSN(channels=32, data_shape=(1, 8, 8)),
...                   DenoisingScoreMatching())            # doctest: +SKIP
>>> model.fit(Digits(), steps=2000, seed=0).sample(64, AnnealedLangevin(), seed=0)  # doctest: +SKIP

``dkit run`` builds exactly these objects from a spec and calls the same methods, so the same
seed gives the same samples either way. A notebook gets what the command line shows and writes:
``progress=True`` draws the same rich progress bar, :meth:`Diffusion.evaluate` computes a run's
metrics and :meth:`SampleResult.save <diffusers_kit.solvers.base.SampleResult.save>` writes its
``samples.png``, ``samples.npz`` and ``metrics.json``.

Without ``batch_size``, :meth:`Diffusion.sample` draws at most :func:`default_batch_size`
samples at once (so a large ``n`` does not exhaust memory) and halves the batch when the device
runs out of memory anyway; an explicit ``batch_size`` is used as given. Memory that runs out at
the smallest batch tried raises :class:`SamplingOutOfMemory` (a ``MemoryError``) that says what
to change.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.checkpoint import load_checkpoint, prefixed, save_checkpoint, unprefixed
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.devices import device_problem, is_out_of_memory
from diffusers_kit.ema import PowerEMA
from diffusers_kit.guidance.base import Guidance, requested_labels
from diffusers_kit.latent import LatentCache, decode
from diffusers_kit.metrics.base import Metric, metric_figures
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.objectives.base import Objective
from diffusers_kit.optim import Adam, Optimizer
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.solvers.base import Progress, SampleResult, Solver
from diffusers_kit.solvers.noise import PerSampleNoise
from diffusers_kit.train import EMA, Distributed, Trainer, TrainLog, TrainSettings

#: Without ``batch_size``, :meth:`Diffusion.sample` draws at most this many samples at once ...
DEFAULT_MAX_BATCH = 4096
#: ... and at most this many values of state (samples x values per sample: 4,096 8x8 digits,
#: 1,365 32x32 RGB images, 21 256x256 RGB images), which keeps the network's activations in
#: the hundreds of megabytes for the built-in networks.
DEFAULT_BATCH_VALUES = 2**22

log = logging.getLogger("diffusers_kit.sample")


def default_batch_size(n: int, data_shape: Sequence[int]) -> int:
    """The batch :meth:`Diffusion.sample` draws at once when it is given no ``batch_size``:
    ``n`` capped at :data:`DEFAULT_MAX_BATCH` samples and :data:`DEFAULT_BATCH_VALUES` values.
    Samples do not depend on the batch (every sample has its own noise stream)."""
    values = max(1, math.prod(int(d) for d in data_shape))
    return max(1, min(int(n), DEFAULT_MAX_BATCH, DEFAULT_BATCH_VALUES // values))


def batch_count(n: int, batch_size: int | None, data_shape: Sequence[int]) -> int:
    """How many batches :meth:`Diffusion.sample` draws ``n`` samples in (``batch_size``, or
    :func:`default_batch_size` without one): the progress bar's total is this many solver
    runs, and a per-sample NFE is the summed ``nfe`` over this many."""
    size = batch_size or default_batch_size(n, data_shape)
    return -(-int(n) // size)


class PluginOutputError(TypeError):
    """A component returned something its kind's protocol does not allow (a bug in it, named
    with the component: the user learns whose it is)."""


def checked_output(solver: Solver, result: object, shape: tuple[int, ...]) -> None:
    """A solver's result must be a :class:`SampleResult` of exactly the requested ``shape``
    (half a batch would otherwise be accepted, and the metrics would look better)."""
    name = type(solver).__name__
    if not isinstance(result, SampleResult):
        raise PluginOutputError(f"solver {name}.sample returned a {type(result).__name__}; "
                                "expected a SampleResult (see Solver.sample)")
    got = tuple(getattr(result.samples, "shape", ()))
    if got != tuple(shape):
        raise PluginOutputError(f"solver {name}.sample returned samples of shape {got} for a "
                                f"batch of shape {tuple(shape)}")
    if not isinstance(result.nfe, int) or result.nfe < 0:
        raise PluginOutputError(f"solver {name}.sample returned nfe={result.nfe!r}; expected "
                                "the count of network evaluations (an int)")


class SamplingOutOfMemory(MemoryError):
    """:meth:`Diffusion.sample` ran out of memory at the smallest batch it tried.

    ``n``: the samples asked for; ``batch_size``: the batch that failed; ``automatic``: whether
    the batch was chosen (and already halved) by :meth:`Diffusion.sample`."""

    def __init__(self, n: int, batch_size: int, automatic: bool, device: torch.device) -> None:
        self.n, self.batch_size, self.automatic, self.device = n, batch_size, automatic, device
        if automatic:
            hint = (f"even {batch_size} sample(s) at a time do not fit: free memory on "
                    f"{device} or use a smaller network")
        else:
            smaller = max(1, batch_size // 4)
            hint = (f"pass a smaller batch_size (in a spec or an override: "
                    f"sample.batch_size={smaller}), or leave it unset to let dkit choose")
        super().__init__(f"out of memory on {device} drawing {n} samples {batch_size} at a "
                         f"time: {hint}")


@contextlib.contextmanager
def progress_bar(description: str, total: int, status: str = "",
                 completed: int = 0) -> Iterator[ProgressBar]:
    """A rich progress bar on standard error (in a notebook: below the cell), as ``dkit run``
    draws; the :class:`ProgressBar` it yields is a ``progress(k)`` callable."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress

    from diffusers_kit.console import make_console

    bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                       console=make_console(stderr=True), transient=False)
    with bar:
        task = bar.add_task(description, total=total, status=status, completed=completed)
        yield ProgressBar(bar, task)


class ProgressBar:
    """``progress(k)`` for one rich task, which can also restate its total and status."""

    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def __call__(self, k: int) -> None:
        self.bar.advance(self.task, k)

    def update(self, **fields: Any) -> None:
        self.bar.update(self.task, **fields)

    def print(self, text: str) -> None:
        """``text`` above the bar (plain, no markup)."""
        self.bar.console.print(text, soft_wrap=True, markup=False)


@contextlib.contextmanager
def _reporter(progress: Progress | bool | None, description: str, total: int, status: str = "",
              completed: int = 0) -> Iterator[Progress | None]:
    """``progress`` as a callable: True draws a bar, False / None report nothing."""
    if progress is True:
        with progress_bar(description, total, status, completed) as bar:
            yield bar
    elif progress is False or progress is None:
        yield None
    else:
        yield progress


def _showing_loss(bar: ProgressBar, on_log: Callable[[int, float], None] | None
                  ) -> Callable[[int, float], None]:
    """``on_log`` that also shows the last logged loss in the bar's status."""

    def logged(step: int, loss: float) -> None:
        bar.update(status=f"loss {loss:.4f}")
        if on_log is not None:
            on_log(step, loss)

    return logged


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a device this machine lacks is a ValueError
    that says why (see :func:`diffusers_kit.devices.device_problem`)."""
    if isinstance(device, torch.device):
        return device
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(str(device))
    if problem is not None:
        raise ValueError(f"device {str(device)!r}: expected {problem}")
    return torch.device(device)


class Diffusion:
    """A diffusion / score-based model: ``process`` + ``network`` (+ ``objective`` to train).

    With ``autoencoder`` (a trained first stage, :mod:`diffusers_kit.latent`) it is a latent
    diffusion model: ``network`` works on the autoencoder's latents (its ``data_shape`` is the
    autoencoder's ``latent_shape``), :meth:`fit` takes images and encodes them once,
    :meth:`sample` returns decoded images (the latents in the result's ``latents``). The
    autoencoder is frozen. The same class trains a first stage itself: ``process=None``, an
    autoencoder as ``network`` and the objective ``reconstruction``; :meth:`fit` then sets the
    autoencoder's latent scale factor at the end (:meth:`Autoencoder.calibrate`).
    """

    def __init__(
        self,
        process: NoiseProcess | None,
        network: Network,
        objective: Objective | None = None,
        *,
        device: str | torch.device = "auto",
        autoencoder: Autoencoder | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.process = process
        self.objective = objective
        self.model = ScoreModel(process, network).to(self.device)  # type: ignore[arg-type]
        self.latents: LatentCache | None = None
        if autoencoder is not None:
            shape = tuple(getattr(network, "data_shape", ()) or ())
            if shape and shape != tuple(autoencoder.latent_shape):
                raise ValueError(f"the network works on data of shape {shape}; the "
                                 f"autoencoder's latents have shape "
                                 f"{tuple(autoencoder.latent_shape)}")
            autoencoder.to(self.device).eval().requires_grad_(False)
            self.model.autoencoder = autoencoder
            self.latents = LatentCache(autoencoder)
        self.ema: EMA | None = None
        #: power-function EMAs and their snapshots (post-hoc EMA), when training kept them
        self.post_hoc: PowerEMA | None = None
        self.trainer: Trainer | None = None
        self.train_log = TrainLog()
        self.step = 0

    @property
    def network(self) -> Network:
        return self.model.network

    @property
    def autoencoder(self) -> Autoencoder | None:
        """The frozen first stage of a latent diffusion model (None: pixel space)."""
        return self.model.autoencoder

    def fit(
        self,
        data: Dataset | DataSplits | torch.Tensor,
        *,
        steps: int = 2000,
        batch_size: int = 128,
        optimizer: Optimizer | None = None,
        ema_decay: float = 0.999,
        grad_clip: float | None = 1.0,
        seed: int = 0,
        log_every: int = 50,
        checkpoint_every: int = 0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_accumulation: int = 1,
        precision: str = "fp32",
        compile: bool = False,
        resume: str | Path | None = None,
        distributed: Distributed | None = None,
        on_log: Callable[[int, float], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        progress: Progress | bool | None = None,
        post_hoc_sigma_rels: Sequence[float] = (),
        post_hoc_every: int = 100,
    ) -> Diffusion:
        """Train on ``data`` (a dataset component, its splits, or a tensor of examples).

        ``steps`` is the step count to reach: a fresh fit trains that many steps; with
        ``resume`` (a checkpoint written by :meth:`save` during an earlier fit with the same
        settings) training continues from the checkpoint's step and ends exactly where an
        uninterrupted run would have. ``batch_size`` is per micro-batch and per rank: an optimizer
        step sees ``batch_size * grad_accumulation * ranks`` examples. ``progress=True`` draws
        ``dkit run``'s progress bar (steps done, the last logged loss); a callable is told of
        every step done (``progress(1)``). ``post_hoc_sigma_rels``: keep power-function EMAs of
        these widths and snapshot them every ``post_hoc_every`` steps (post-hoc EMA,
        :mod:`diffusers_kit.ema`; :meth:`use_post_hoc_ema` then samples with any width).
        """
        if self.objective is None:
            raise ValueError("this Diffusion has no objective to train with")
        if isinstance(data, Dataset):
            data = data.load()
        labels = None
        if isinstance(data, DataSplits):
            labels = data.train_labels
            train = data.train
        else:
            train = data
        if self.network.num_classes is None and not self.objective.needs_labels:
            labels = None
        elif labels is not None:
            labels = labels.to(self.device)
        train = train.to(self.device, torch.float32)
        if self.latents is not None:  # latent diffusion: the images are encoded once
            train = self.latents.latents(train)
        self.ema = EMA(self.network, ema_decay) if ema_decay > 0 else None
        settings = TrainSettings(steps, batch_size, ema_decay, grad_clip, log_every,
                                 checkpoint_every, lr_schedule, warmup_steps, min_lr_ratio,
                                 grad_accumulation, precision, compile)
        start = self.step
        self.post_hoc = (PowerEMA(self.network, post_hoc_sigma_rels, post_hoc_every)
                         if post_hoc_sigma_rels else None)
        self.trainer = Trainer(self.model, self.objective, train, optimizer or Adam(), settings,
                               seed=seed, ema=self.ema, labels=labels, dist=distributed,
                               post_hoc=self.post_hoc)
        if resume is not None:
            self.load(resume, training_state=True)
            start = 0
        until = start + steps if resume is None else steps
        with _reporter(progress, "train", until, completed=min(self.trainer.step, until)
                       ) as report:
            logged = (_showing_loss(report, on_log) if isinstance(report, ProgressBar)
                      else on_log)
            log = self.trainer.run(until, on_log=logged, on_checkpoint=on_checkpoint,
                                   progress=report)
        self.train_log, self.step = log, start + self.trainer.step
        if isinstance(self.network, Autoencoder):
            self.calibrate(train)
        return self

    def calibrate(self, images: torch.Tensor) -> float:
        """Set a first stage's latent scale factor ``1 / std(z)`` over ``images`` with its
        sampling (EMA) weights, in both the live and the EMA weights; returns it."""
        if not isinstance(self.network, Autoencoder):
            raise ValueError("only an autoencoder has a latent scale factor to calibrate")
        with self.sampling_weights():
            scale = self.network.calibrate(images.to(self.device, torch.float32))
        self.network.scale.fill_(scale)  # the block restored the pre-calibration buffer
        return scale

    def model_data(self, data: DataSplits) -> DataSplits:
        """The data as the network sees it: ``data`` itself, or its latents for a latent
        diffusion model (encoded once; the figures of metrics of the model alone are computed
        on these)."""
        return data if self.latents is None else self.latents.splits(data)

    def sampling_state(self) -> dict[str, torch.Tensor]:
        """Weights used for sampling: the EMA when there is one."""
        if self.ema is not None:
            return self.ema.state_dict(self.network)
        return self.network.state_dict()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        solver: Solver,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        use_ema: bool = True,
        progress: Progress | bool | None = None,
        x_T: torch.Tensor | None = None,
        guidance: Sequence[Guidance] = (),
        labels: str | int | Sequence[int] | torch.Tensor | None = None,
        measurements: torch.Tensor | None = None,
        first: int = 0,
    ) -> SampleResult:
        """Draw ``n`` samples with ``solver``; uses the EMA weights when there are some.

        Every sample has its own random stream (:class:`~diffusers_kit.solvers.PerSampleNoise`
        keyed by ``seed`` and the sample's index), so sample ``i`` is the same whatever
        ``batch_size`` is. Without ``batch_size`` at most :func:`default_batch_size` samples are
        drawn at once, and a batch that runs out of memory is drawn again in halves; a given
        ``batch_size`` is used as is. Memory that still runs out raises
        :class:`SamplingOutOfMemory`, saying what to change. ``x_T`` (``n`` samples' start
        noise) replaces the prior draw. ``progress=True`` draws ``dkit run``'s progress bar; a
        callable ``progress(k)`` is told of every ``k`` solver steps done, over all batches
        (:meth:`Solver.total_steps <diffusers_kit.solvers.base.Solver.total_steps>` per batch).

        ``labels`` are the classes to draw (``"all"``, a class, a list of classes in equal
        blocks, or ``n`` labels; see :func:`~diffusers_kit.guidance.requested_labels`): a
        class-conditional network is given them, and ``guidance`` terms
        (:mod:`diffusers_kit.guidance`) are added to the model's prediction for every solver.
        The labels used are in the result's ``labels``. ``measurements`` (``n`` of them, one
        ``y`` per sample) are what the measurement terms (:mod:`diffusers_kit.guidance.
        measurement`) condition on; :func:`diffusers_kit.restore.restore` simulates them.

        ``first`` is the global index of the first sample: the samples drawn are those with
        indices ``first, ..., first + n - 1`` of the seed's streams, so a shard drawing
        ``n`` samples from ``first`` gets exactly the rows ``first:first + n`` of one call
        drawing them all (``dkit sample --shard``). ``labels`` and ``x_T`` are the shard's own.
        """
        reason = solver.check(self.process)
        if reason is not None:
            raise ValueError(f"{type(solver).__name__} needs {reason}")
        for term in guidance:
            if (reason := term.check(self.model)) is not None:
                raise ValueError(f"{type(term).__name__} needs {reason}")
        chosen = requested_labels(labels, n, self.num_classes(guidance))
        if chosen is None and any(term.needs_labels for term in guidance):
            raise ValueError("guidance needs labels: pass labels='all', a class or a list")
        if chosen is not None:
            chosen = chosen.to(self.device)
        if any(term.needs_measurement for term in guidance) and measurements is None:
            raise ValueError("guidance needs measurements: one y per sample (see "
                             "diffusers_kit.restore.restore)")
        if measurements is not None:
            if len(measurements) != n:
                raise ValueError(f"{len(measurements)} measurements for {n} samples")
            measurements = measurements.to(self.device)
        shape = tuple(self.network.data_shape)
        if x_T is not None and tuple(x_T.shape) != (n, *shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected {(n, *shape)}")
        chunks, nfe, trajectory, x0_predictions, times = [], 0, [], [], []
        automatic = batch_size is None
        size = default_batch_size(n, shape) if batch_size is None else batch_size
        largest = 0
        steps = solver.total_steps(self.process)
        with _reporter(progress, "sample", steps * -(-n // size),
                       type(solver).__name__) as report, self.sampling_weights(use_ema):
            start = 0
            while start < n:
                count = min(size, n - start)
                init = None if x_T is None else x_T[start:start + count]
                model = self.model
                if guidance or chosen is not None:
                    model = model.guided(
                        guidance, None if chosen is None else chosen[start:start + count],
                        None if measurements is None else measurements[start:start + count])
                try:
                    result = solver.sample(model, (count, *shape), progress=report,
                                           noise=PerSampleNoise(seed, first + start), x_T=init)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if not automatic or count == 1:
                        raise SamplingOutOfMemory(n, count, automatic, self.device) from exc
                    result = None  # retried below, once the failed batch's memory is free
                if result is None:
                    size = max(1, count // 2)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    message = (f"out of memory drawing {count} samples at once on "
                               f"{self.device}; drawing {size} at a time")
                    if isinstance(report, ProgressBar):  # the failed batch's steps do not count
                        done = len(chunks)
                        report.update(completed=steps * done,
                                      total=steps * (done + -(-(n - start) // size)))
                        report.print(f"note: {message}")
                    else:
                        log.warning(message)
                    continue
                checked_output(solver, result, (count, *shape))
                chunks.append(result.samples)
                nfe += result.nfe
                trajectory.append(result.trajectory)
                x0_predictions.append(result.x0_predictions)
                times = result.times
                largest = max(largest, count)
                start += count
        merged = [torch.cat(level) for level in zip(*trajectory, strict=True)]
        merged_x0 = [torch.cat(level) for level in zip(*x0_predictions, strict=True)]
        samples, latents = torch.cat(chunks), None
        if self.autoencoder is not None:  # what a person looks at and metrics judge: images
            latents = samples
            samples = decode(self.autoencoder, latents)
            merged = [decode(self.autoencoder, level) for level in merged]
            merged_x0 = [decode(self.autoencoder, level) for level in merged_x0]
        result = SampleResult(samples, nfe, merged, merged_x0, times)
        result.latents = latents
        result.labels = None if chosen is None else chosen.cpu()
        result.batch_size = largest
        return result

    def evaluate(self, samples: SampleResult | torch.Tensor, data: Dataset | DataSplits,
                 metrics: Metric | Sequence[Metric], *, seed: int = 0,
                 labels: torch.Tensor | None = None) -> dict[str, float]:
        """The figures ``dkit run``'s evaluate stage computes for ``samples`` against ``data``
        (a data set component or its splits): each metric's value beside its noise floor with
        intervals, in the run's order, with the run's sampling weights and generator (so
        ``seed`` = the spec's seed gives the run's ``metrics.json``), plus ``out_of_range``
        when some samples leave the training data's range. A result's labels are used by
        metrics that take labels (``class_accuracy``)."""
        from diffusers_kit.metrics.range import out_of_range

        if isinstance(samples, SampleResult):
            labels = samples.labels if labels is None else labels
            samples = samples.samples
        samples = samples.detach().float().cpu()
        splits = data.load() if isinstance(data, Dataset) else data
        chosen = [metrics] if isinstance(metrics, Metric) else list(metrics)
        generator = torch.Generator().manual_seed(seed)
        figures: dict[str, float] = {}
        model_data = self.model_data(splits)
        with self.sampling_weights() as model:
            for metric in chosen:
                figures.update(metric_figures(metric, samples, splits, generator, model, labels,
                                              model_data))
        figures.update(out_of_range(samples, splits.train))
        return figures

    def num_classes(self, guidance: Sequence[Guidance] = ()) -> int | None:
        """The classes labels may name: a class-conditional network's, else the first that a
        guidance term knows (a classifier's outputs); None when nothing knows."""
        known = getattr(self.network, "num_classes", None)
        for term in guidance:
            known = known if known is not None else term.num_classes()
        return known

    @contextlib.contextmanager
    def sampling_weights(self, use_ema: bool = True) -> Iterator[ScoreModel]:
        """Within the block the network holds its sampling (EMA) weights and is in eval mode."""
        saved = None
        if use_ema and self.ema is not None:
            saved = {k: v.clone() for k, v in self.network.state_dict().items()}
            self.network.load_state_dict(self.ema.state_dict(self.network))
        was_training = self.model.training
        self.model.eval()
        try:
            yield self.model
        finally:
            if saved is not None:
                self.network.load_state_dict(saved)
            self.model.train(was_training)

    def use_post_hoc_ema(self, sigma_rel: float, step: int | None = None) -> float:
        """Make the sampling weights the power-function EMA of relative width ``sigma_rel`` at
        ``step`` (default: the last snapshot's), reconstructed from the stored snapshots
        (:meth:`diffusers_kit.ema.PowerEMA.reconstruct`); returns the reconstructed profile's
        relative ``L^2`` distance from the requested one (:func:`diffusers_kit.ema.
        profile_error`). A ValueError when training stored no snapshots."""
        from diffusers_kit.ema import gamma_of_sigma_rel, profile_error

        if self.post_hoc is None or not self.post_hoc.snapshots:
            raise ValueError("a model trained with post-hoc EMA snapshots (train.post_hoc_ema);"
                             " this one stored none")
        post_hoc = self.post_hoc
        last = max(s for s, _, _ in post_hoc.snapshots) if step is None else step
        weights = post_hoc.reconstruct(sigma_rel, last)
        if self.ema is None:
            self.ema = EMA(self.network, 0.0)
        self.ema.load(self.network, {k: v.to(self.device) for k, v in weights.items()})
        used = [(s, g) for s, g, _ in post_hoc.snapshots if s <= last]
        return profile_error(used, last, gamma_of_sigma_rel(sigma_rel))

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write weights, EMA weights and (after :meth:`fit`) the full training state — optimizer
        moments, data order, random generators — to a safetensors file, atomically."""
        tensors = prefixed("network", self.network.state_dict())
        if self.ema is not None:
            tensors.update(prefixed("ema", self.ema.state_dict(self.network)))
        meta: dict = {"step": self.step, **(metadata or {})}
        if self.trainer is not None:
            state, train_meta = self.trainer.state()
            tensors.update(prefixed("train", state))
            meta["training"] = train_meta
        save_checkpoint(Path(path), tensors, meta)

    def load(self, path: str | Path, *, training_state: bool = False) -> dict:
        """Load weights written by :meth:`save`; returns the checkpoint's metadata.
        ``training_state`` (used by :meth:`fit` to resume) restores the trainer's state too."""
        tensors, metadata = load_checkpoint(Path(path))
        self.network.load_state_dict(unprefixed("network", tensors))
        ema_state = unprefixed("ema", tensors)
        if ema_state:
            if self.ema is None:
                self.ema = EMA(self.network, 0.999)
            self.ema.load(self.network, ema_state)
        self.step = int(metadata.get("step", 0))
        post_hoc = metadata.get("training", {}).get("post_hoc")
        if post_hoc is not None and not training_state:  # (a resume loads it into the trainer's)
            self.post_hoc = PowerEMA.from_state(
                self.network, unprefixed("post_hoc", unprefixed("train", tensors)), post_hoc)
        if training_state:
            assert self.trainer is not None
            if "training" not in metadata:
                raise ValueError(f"{path} holds weights only, no training state to resume from")
            self.trainer.load_state(unprefixed("train", tensors), metadata["training"])
        return metadata

    # -- runs -------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        source: str | Path,
        *,
        root: str | Path = "runs",
        rebuild: bool = False,
        quiet: bool = True,
    ) -> Diffusion:
        """The trained model of a run folder (``runs/NAME/latest`` works), or of a spec file —
        trained under ``root`` first when no finished run has its training hash (the same
        content-addressed reuse as ``dkit run``; see :mod:`diffusers_kit.pipeline`)."""
        from diffusers_kit.references import SPEC_SUFFIXES, TrainedModel, open_run

        folder = Path(source)
        if folder.suffix in SPEC_SUFFIXES:
            model = TrainedModel.resolve(str(source), root=root, rebuild=rebuild, quiet=quiet)
            assert model.run_dir is not None
            folder = model.run_dir
        _, components = open_run(folder)
        return components.diffusion

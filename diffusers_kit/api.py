"""The Python API: compose a process, a network and an objective; fit; sample.

>>> import torch
>>> from diffusers_kit import VE, NCSN, DenoisingScoreMatching, AnnealedLangevin, Digits, Diffusion
>>> torch.manual_seed(0)                                   # seeds the network's initial weights
>>> model = Diffusion(VE(sigma_max=8.0), NCSN(channels=32, data_shape=(1, 8, 8)),
...                   DenoisingScoreMatching())            # doctest: +SKIP
>>> model.fit(Digits(), steps=2000, seed=0).sample(64, AnnealedLangevin(), seed=0)  # doctest: +SKIP

``dkit run`` builds exactly these objects from a spec and calls the same methods, so the same
seed gives the same samples either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from diffusers_kit.checkpoint import load_checkpoint, prefixed, save_checkpoint, unprefixed
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.devices import device_problem
from diffusers_kit.guidance.base import Guidance, requested_labels
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks.base import Network
from diffusers_kit.objectives.base import Objective
from diffusers_kit.optim import Adam, Optimizer
from diffusers_kit.processes.base import NoiseProcess
from diffusers_kit.solvers.base import Progress, SampleResult, Solver
from diffusers_kit.solvers.noise import PerSampleNoise
from diffusers_kit.train import EMA, Distributed, Trainer, TrainLog, TrainSettings


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
    """A diffusion / score-based model: ``process`` + ``network`` (+ ``objective`` to train)."""

    def __init__(
        self,
        process: NoiseProcess,
        network: Network,
        objective: Objective | None = None,
        *,
        device: str | torch.device = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.process = process
        self.objective = objective
        self.model = ScoreModel(process, network).to(self.device)
        self.ema: EMA | None = None
        self.trainer: Trainer | None = None
        self.train_log = TrainLog()
        self.step = 0

    @property
    def network(self) -> Network:
        return self.model.network

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
        progress: Progress | None = None,
    ) -> Diffusion:
        """Train on ``data`` (a dataset component, its splits, or a tensor of examples).

        ``steps`` is the step count to reach: a fresh fit trains that many steps; with
        ``resume`` (a checkpoint written by :meth:`save` during an earlier fit with the same
        settings) training continues from the checkpoint's step and ends exactly where an
        uninterrupted run would have. ``batch_size`` is per micro-batch and per rank: an optimizer
        step sees ``batch_size * grad_accumulation * ranks`` examples.
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
        self.ema = EMA(self.network, ema_decay) if ema_decay > 0 else None
        settings = TrainSettings(steps, batch_size, ema_decay, grad_clip, log_every,
                                 checkpoint_every, lr_schedule, warmup_steps, min_lr_ratio,
                                 grad_accumulation, precision, compile)
        start = self.step
        self.trainer = Trainer(self.model, self.objective, train, optimizer or Adam(), settings,
                               seed=seed, ema=self.ema, labels=labels, dist=distributed)
        if resume is not None:
            self.load(resume, training_state=True)
            start = 0
        log = self.trainer.run(start + steps if resume is None else steps, on_log=on_log,
                               on_checkpoint=on_checkpoint, progress=progress)
        self.train_log, self.step = log, start + self.trainer.step
        return self

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
        progress: Progress | None = None,
        x_T: torch.Tensor | None = None,
        guidance: Sequence[Guidance] = (),
        labels: str | int | Sequence[int] | torch.Tensor | None = None,
        measurements: torch.Tensor | None = None,
    ) -> SampleResult:
        """Draw ``n`` samples with ``solver``; uses the EMA weights when there are some.

        Every sample has its own random stream (:class:`~diffusers_kit.solvers.PerSampleNoise`
        keyed by ``seed`` and the sample's index), so sample ``i`` is the same whatever
        ``batch_size`` is. ``x_T`` (``n`` samples' start noise) replaces the prior draw.

        ``labels`` are the classes to draw (``"all"``, a class, a list of classes in equal
        blocks, or ``n`` labels; see :func:`~diffusers_kit.guidance.requested_labels`): a
        class-conditional network is given them, and ``guidance`` terms
        (:mod:`diffusers_kit.guidance`) are added to the model's prediction for every solver.
        The labels used are in the result's ``labels``. ``measurements`` (``n`` of them, one
        ``y`` per sample) are what the measurement terms (:mod:`diffusers_kit.guidance.
        measurement`) condition on; :func:`diffusers_kit.restore.restore` simulates them.
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
        size = batch_size or n
        with self.sampling_weights(use_ema):
            for start in range(0, n, size):
                count = min(size, n - start)
                init = None if x_T is None else x_T[start:start + count]
                model = self.model
                if guidance or chosen is not None:
                    model = model.guided(
                        guidance, None if chosen is None else chosen[start:start + count],
                        None if measurements is None else measurements[start:start + count])
                result = solver.sample(model, (count, *shape), progress=progress,
                                       noise=PerSampleNoise(seed, start), x_T=init)
                chunks.append(result.samples)
                nfe += result.nfe
                trajectory.append(result.trajectory)
                x0_predictions.append(result.x0_predictions)
                times = result.times
        merged = [torch.cat(level) for level in zip(*trajectory, strict=True)]
        merged_x0 = [torch.cat(level) for level in zip(*x0_predictions, strict=True)]
        result = SampleResult(torch.cat(chunks), nfe, merged, merged_x0, times)
        result.labels = None if chosen is None else chosen.cpu()
        return result

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
        from diffusers_kit.graph import open_run
        from diffusers_kit.pipeline import SPEC_SUFFIXES, TrainedModel

        folder = Path(source)
        if folder.suffix in SPEC_SUFFIXES:
            model = TrainedModel.resolve(str(source), root=root, rebuild=rebuild, quiet=quiet)
            assert model.run_dir is not None
            folder = model.run_dir
        _, components = open_run(folder)
        return components.diffusion

"""The training engine: minibatches, optimizer with warm-up / cosine decay, gradient clipping and
accumulation, EMA, mixed precision, checkpoints that resume bit-for-bit, data parallelism.

Host synchronisation happens only every ``log_every`` steps (to report the loss and to stop on a
non-finite one) and at checkpoints: the running loss, and the first step whose loss was not
finite, are kept on the device in between.

Resuming: :meth:`Trainer.state` holds everything the next step depends on — weights, optimizer
moments, EMA, the data order and position, the random generators (data, noise, torch's global
one used by dropout), the loss accumulator and the log — so a run restarted from step k
repeats exactly the steps k+1.. of an uninterrupted run (on CPU, same thread count).

Data parallel (``torchrun``): every rank draws the same data permutation and takes its own
slice of each global batch; noise comes from a per-rank generator; the gradients are averaged
over the ranks before each optimizer step, by one of two routes:

- ``DistributedDataParallel`` for objectives that declare ``ddp_ready``
  (:class:`~diffusers_kit.objectives.base.Objective`): the network is wrapped, the objective
  gets a view of the model that calls the wrapper (:meth:`ScoreModel.through`), and the
  gradients are all-reduced in buckets while backward still runs;
- otherwise the same algorithm written out: one all-reduce of all gradients after backward.
  Implicit / sliced score matching need it (they differentiate twice, which DDP's reducer does
  not support), and it is the safe default for an objective that does not say.

Both average the same numbers (sum over ranks, divided by the world size), so they give the
same parameters to float rounding (``tests/test_ddp.py``). Only rank 0 calls the checkpoint and
log callbacks.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffusers_kit.checkpoint import prefixed, unprefixed
from diffusers_kit.model import ScoreModel
from diffusers_kit.objectives.base import Objective
from diffusers_kit.optim import Optimizer

if TYPE_CHECKING:
    from diffusers_kit.ema import PowerEMA

PRECISIONS = ("fp32", "bf16", "fp16")
DATA_PARALLEL = ("auto", "ddp", "all_reduce")
LOSS_WINDOW = 256


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class PeerLost(RuntimeError):
    """A collective of data-parallel training failed because another rank is gone (its process
    died, its node went away); ``step``: the step being trained, ``checkpoint``: the step of the
    last checkpoint (or None)."""

    def __init__(self, step: int, checkpoint: int | None, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        kept = (f"the checkpoint of step {checkpoint} is kept" if checkpoint
                else "no checkpoint was written")
        super().__init__(f"another rank of the data-parallel job is gone (its process died or "
                         f"its node went away) during step {step}: {type(cause).__name__}: "
                         f"{first[:300]}; {kept}")
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir: Any = None  # the run folder, filled in by the run graph


# how gloo's transport and the c10d store report a peer that went away (torch raises NCCL's
# and the store's failures as DistError subclasses; gloo's as plain RuntimeErrors)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Connection refused")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a collective, means another rank is gone."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or any(text in str(exc) for text in _PEER_GONE)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``step`` is the step whose checkpoint was written (or None)."""

    def __init__(self, step: int, saved: bool) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step = step
        self.saved = saved
        self.run_dir: Any = None  # the run folder, filled in by the run graph


class EMA:
    """Exponential moving average of the parameters, bias-corrected.

    After ``k`` updates with parameters ``p_1 .. p_k`` the average is::

        a_k = sum_j decay^(k-j) (1 - decay) p_j / (1 - decay^k),

    the exponential average of the *trained* weights only, its weights normalised to sum to 1
    (the bias correction of Adam's moment estimates; Kingma & Ba 2015, sec. 3). Recursively
    ``a_k = a_(k-1) + w_k (p_k - a_(k-1))`` with ``w_k = (1 - decay) / (1 - decay^k)``, so
    ``a_1 = p_1``. The plain recursion ``shadow <- decay * shadow + (1 - decay) * p`` started
    from the initial weights would leave them a weight ``decay^k`` in the average (22 % after
    1,500 steps at ``decay = 0.999``; what that did to samples: ``docs/training.md``). Once
    ``decay^k`` is negligible the two agree.

    ``update(module, k)`` takes the 1-based update count ``k`` (the trainer's step), so that a
    resumed run continues the same weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self._params = [p.detach() for p in module.parameters()]
        self._module_id = id(module)
        self.count = 0

    def weight(self, count: int) -> float:
        """``w_k = (1 - decay) / (1 - decay^k)``: the new parameters' weight at update ``k``."""
        return (1.0 - self.decay) / (1.0 - self.decay ** count)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, count: int | None = None) -> None:
        """Fold in ``module``'s parameters as update number ``count`` (default: the next)."""
        if id(module) != self._module_id:
            self._params = [p.detach() for p in module.parameters()]
            self._module_id = id(module)
        self.count = self.count + 1 if count is None else count
        torch._foreach_lerp_(self.shadow, self._params, self.weight(self.count))

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with parameters replaced by their averages."""
        state = dict(module.state_dict())
        for (name, _), value in zip(module.named_parameters(), self.shadow, strict=True):
            state[name] = value
        return state

    def load(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        names = [name for name, _ in module.named_parameters()]
        for index, name in enumerate(names):
            self.shadow[index].copy_(state[name])


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 128
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    log_every: int = 50
    checkpoint_every: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accumulation: int = 1
    precision: str = "fp32"
    compile: bool = False


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the base learning rate at ``step`` (1-based): linear warm-up over
    ``warmup_steps``, then constant or a half cosine from 1 down to ``min_lr_ratio`` at the last
    step (Loshchilov & Hutter 2017, without restarts)."""
    if settings.warmup_steps and step <= settings.warmup_steps:
        return step / settings.warmup_steps
    if settings.lr_schedule == "cosine":
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        floor = settings.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# -- distributed ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job (``rank 0 of 1`` when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def distributed_from_env(device_type: str = "cpu") -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on
    CUDA); a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Distributed(rank, world, local)


def leave_distributed(distributed: Distributed) -> None:
    """Wait for every rank (rank 0 samples and writes while the others are done), then tear the
    process group down: a rank that exits with its group alive aborts in gloo's destructor."""
    if not distributed.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        from torch.distributed import distributed_c10d

        # DistributedDataParallel wrappers no longer reachable (a finished trainer held in a
        # reference cycle) must be finalised while their group is alive: a reducer destroyed
        # after destroy_process_group can abort the process at exit.
        gc.collect()
        store = distributed_c10d._get_default_store()
        dist.barrier()
        dist.destroy_process_group()
        # No rank may close its sockets while a peer is still tearing its gloo context down
        # (the peer then aborts): meet once more on the rendezvous store, which outlives the
        # group (torchrun's agent hosts it).
        store.add("dkit_left", 1)
        deadline = time.monotonic() + 60
        while int(store.add("dkit_left", 0)) < distributed.world and time.monotonic() < deadline:
            time.sleep(0.01)


# -- checkpoint state: tensors plus JSON metadata ----------------------------------------------
def optimizer_state(optim: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optim.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optim: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    # the moments come from the checkpoint, the hyperparameters from this run's optimizer: the
    # same unless a resume changed them on purpose (--allow-change train.optimizer.lr)
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optim.param_groups]
    optim.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, settings in zip(optim.param_groups, fresh, strict=True):
        group.update(settings)


class _StopFlag:
    """SIGINT sets a flag that the loop checks between steps, so Ctrl-C never interrupts a step
    half-way (a checkpoint written then would mix two steps' states)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Minimise ``objective`` over ``data`` with ``optimizer``; resumable, data parallel."""

    def __init__(
        self,
        model: ScoreModel,
        objective: Objective,
        data: torch.Tensor,
        optimizer: Optimizer,
        settings: TrainSettings,
        *,
        seed: int = 0,
        ema: EMA | None = None,
        labels: torch.Tensor | None = None,
        dist: Distributed | None = None,
        post_hoc: PowerEMA | None = None,
        data_parallel: str = "auto",
    ) -> None:
        self.model, self.objective, self.data, self.labels = model, objective, data, labels
        self.settings, self.ema = settings, ema
        self.post_hoc = post_hoc  # power-function EMAs and their snapshots (diffusers_kit.ema)
        self.dist = dist or Distributed()
        device = data.device
        self.device = device
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {settings.precision!r}")
        if settings.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if self.dist.active:
            self._broadcast_parameters()
        # the objective's own state (a teacher, a target network), built from the weights every
        # rank now shares; a resumed run loads its checkpointed state afterwards (load_state)
        objective.prepare(model)
        self.ddp = self._data_parallel(data_parallel)
        # what the objective evaluates: the model, or its view that calls the DDP wrapper
        self.trained = model if self.ddp is None else model.through(self.ddp)
        self.optim = optimizer.create(self.parameters)
        self.base_lrs = [group["lr"] for group in self.optim.param_groups]
        self.generator = torch.Generator(device).manual_seed(seed)
        # one generator for order and noise in a single process (as always); per-rank noise
        self.noise = (self.generator if not self.dist.active else
                      torch.Generator(device).manual_seed(seed + 7919 * (self.dist.rank + 1)))
        n = data.shape[0]
        self.batch = min(settings.batch_size, n // self.dist.world)
        if self.batch < 1:
            raise ValueError(f"{n} training examples cannot be split over {self.dist.world} ranks")
        self.per_epoch = n // (self.batch * self.dist.world)
        self.order = torch.randperm(n, device=device, generator=self.generator)
        self.micro = 0  # micro-batches drawn so far
        self.step = 0
        self.running = torch.zeros((), device=device)
        self.first_bad = torch.full((), math.inf, device=device)
        # the losses of the last few steps, on the device: one copy per step, folded into
        # running / first_bad every len(window) steps and at log points (no host sync)
        self.window = torch.zeros(min(settings.log_every, LOSS_WINDOW), device=device)
        self.window_steps = torch.arange(1, len(self.window) + 1, device=device,
                                         dtype=torch.float32)
        self.filled = 0
        self.since = 0
        self.log = TrainLog()
        self.last_checkpoint: int | None = None
        self.scaler = (torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            settings.precision)
        if settings.compile:
            model.network.compile()

    # -- one step ---------------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        slot = self.micro % self.per_epoch
        if slot == 0 and self.micro > 0:
            self.order = torch.randperm(self.data.shape[0], device=self.device,
                                        generator=self.generator)
        start = (slot * self.dist.world + self.dist.rank) * self.batch
        index = self.order[start:start + self.batch]
        self.micro += 1
        return self.data[index], (self.labels[index] if self.labels is not None else None)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _data_parallel(self, route: str) -> Any:
        """The ``DistributedDataParallel`` wrapper of the network, or None where the gradients
        are all-reduced by hand: ``route`` ``auto`` (DDP when the objective is ``ddp_ready``
        and every trained parameter is the network's), ``ddp`` (that, or an error saying why
        not) or ``all_reduce``."""
        if route not in DATA_PARALLEL:
            raise ValueError(f"data_parallel must be one of {DATA_PARALLEL}, got {route!r}")
        if not self.dist.active or route == "all_reduce":
            return None
        network = self.model.network
        own = {id(p) for p in network.parameters()}
        why = ("" if getattr(self.objective, "ddp_ready", False) else
               f"objective {type(self.objective).__name__} does not declare ddp_ready")
        if not why and any(id(p) not in own for p in self.parameters):
            why = "some trained parameters are not the network's"
        if why:
            if route == "ddp":
                raise ValueError(f"cannot train through DistributedDataParallel: {why}")
            return None
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        # buffers were broadcast once above, as on the all-reduce route, and are not synced at
        # every forward (the keyword is forward_sync_buffers since torch 2.13)
        sync = ("forward_sync_buffers"
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        unused = self._some_parameter_unused()
        # torch warns (in every process, on stderr) that a 1x1 convolution's gradient is laid
        # out unlike its bucket slot: size-1 dimensions, costing one copy, "not an error"
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        wrapper = DistributedDataParallel(
            network, device_ids=[self.device] if cuda else None,
            output_device=self.device if cuda else None, **{sync: False},
            find_unused_parameters=unused)
        if not unused:
            # DDP regroups its gradient buckets after its first step, in the order the
            # gradients arrived; with more than two ranks a bucket's sums round differently in
            # another grouping. One throw-away step through the wrapper here puts every real
            # step, of a new run or a resumed one, on the regrouped buckets: a resumed run then
            # repeats an uninterrupted one bit for bit (without unused parameters DDP never
            # regroups).
            with self._probing() as (probe, labels):
                self.objective.loss(self.model.through(wrapper), self.data[:2], probe,
                                    labels).backward()
            for parameter in self.parameters:
                parameter.grad = None
        return wrapper

    @contextmanager
    def _probing(self) -> Any:
        """For a loss evaluated outside training: eval mode (no dropout, no batch statistics
        updated), torch's random state restored afterwards, a generator of its own and the
        labels of the first two examples; yields ``(generator, labels)``."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                       else []):
                probe = torch.Generator(self.device).manual_seed(0)
                yield probe, (self.labels[:2] if self.labels is not None else None)
        finally:
            self.model.train(training)

    def _some_parameter_unused(self) -> bool:
        """Whether a trained parameter gets no gradient from the objective's loss (a network
        that skips a branch): DDP must then look for such parameters at every step (a traversal
        of the autograd graph), else it would wait for their gradients forever. Found by one
        loss on two examples (:meth:`_probing`: training is not touched), agreed on by all
        ranks."""
        import torch.distributed as dist

        with self._probing() as (probe, labels):
            loss = self.objective.loss(self.model, self.data[:2], probe, labels)
            grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        unused = torch.tensor([float(any(g is None for g in grads))], device=self.device)
        dist.all_reduce(unused, op=dist.ReduceOp.MAX)
        return bool(unused.item() > 0)

    def _all_reduce_gradients(self) -> None:
        import torch.distributed as dist

        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.parameters]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.dist.world
        for grad, value in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads),
                               strict=True):
            grad.copy_(value)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (``grad_accumulation`` micro-batches); returns the loss tensor."""
        settings = self.settings
        if settings.warmup_steps or settings.lr_schedule != "constant":
            factor = learning_rate_factor(step, settings)
            for group, base in zip(self.optim.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * factor
        self.optim.zero_grad(set_to_none=True)
        accumulate = settings.grad_accumulation
        total = None
        for index in range(accumulate):
            x0, labels = self._next_batch()
            # DDP reduces during the last micro-batch's backward only (the others accumulate)
            local = (self.ddp.no_sync() if self.ddp is not None and index < accumulate - 1
                     else nullcontext())
            with local:
                with self._autocast():
                    loss = self.objective.loss(self.trained, x0, self.noise, labels)
                if accumulate > 1:
                    loss = loss / accumulate
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.dist.active and self.ddp is None:
            self._all_reduce_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optim)
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, settings.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            self.optim.step()
        if self.ema is not None:
            self.ema.update(self.model.network, step)
        if self.post_hoc is not None:
            self.post_hoc.update(self.model.network, step)
        self.objective.after_step(self.model, step)
        assert total is not None
        return total

    # -- the loop ---------------------------------------------------------------------------
    def run(
        self,
        until: int,
        *,
        on_log: Callable[[int, float], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TrainLog:
        """Train from ``self.step`` to step ``until``."""
        try:
            return self._run(until, on_log, on_checkpoint, progress)
        except RuntimeError as exc:
            if self.dist.active and lost_peer(exc):
                self.model.eval()
                raise PeerLost(self.step + 1, self.last_checkpoint, exc) from exc
            raise

    def _run(self, until: int, on_log: Callable[[int, float], None] | None,
             on_checkpoint: Callable[[int], None] | None,
             progress: Callable[[int], None] | None) -> TrainLog:
        settings = self.settings
        self.model.train()
        with _StopFlag() as stop:
            while self.step < until:
                if stop.requested and not self.dist.active:
                    self._interrupt(on_checkpoint)
                step = self.step + 1
                loss = self.train_step(step)
                self.step = step
                self.window[self.filled] = loss
                self.filled += 1
                self.since += 1
                if self.filled == len(self.window):
                    self._fold()
                if step % settings.log_every == 0 or step == until:
                    self._log_point(step, on_log)
                    if self.dist.active and self._any_rank(stop.requested):
                        self._interrupt(on_checkpoint)
                if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                    self.checkpoint(on_checkpoint)
                if progress is not None:
                    progress(1)
        self.model.eval()
        return self.log

    def _fold(self) -> None:
        """Add the window's losses to ``running`` and note its first non-finite step, on the
        device (the steps of the window are ``step - filled + 1 .. step``)."""
        if self.filled == 0:
            return
        losses = self.window[:self.filled]
        self.running += losses.sum()
        steps = self.window_steps[:self.filled] + float(self.step - self.filled)
        bad = torch.where(torch.isfinite(losses), math.inf, steps).min()
        self.first_bad = torch.minimum(self.first_bad, bad)
        self.filled = 0

    def _any_rank(self, flag: bool) -> bool:
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)  # NCCL: on the GPU
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def _interrupt(self, on_checkpoint: Callable[[int], None] | None) -> None:
        saved = False
        if self.step > 0 and self.step != self.last_checkpoint:
            self.checkpoint(on_checkpoint)
            saved = on_checkpoint is not None
        self.model.eval()
        raise TrainingInterrupted(self.step, saved or self.last_checkpoint is not None)

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist.active:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value /= self.dist.world
        return value

    def _check_finite(self, step: int) -> None:
        self._fold()
        first_bad = self.first_bad
        if self.dist.active:
            import torch.distributed as dist

            first_bad = first_bad.clone()
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        bad = float(first_bad)
        if math.isfinite(bad):
            kept = (f"the last good checkpoint (step {self.last_checkpoint}) is kept"
                    if self.last_checkpoint else "no checkpoint was written")
            raise TrainingDiverged(
                f"the loss became NaN or infinite at step {int(bad)} (checked at step {step}); "
                f"{kept}. Try a smaller learning rate, gradient clipping or fp32.")

    def _log_point(self, step: int, on_log: Callable[[int, float], None] | None) -> None:
        self._check_finite(step)
        mean = float(self._reduce_mean(self.running)) / self.since  # the host sync
        self.log.steps.append(step)
        self.log.losses.append(mean)
        if on_log is not None and self.dist.main:
            on_log(step, mean)
        self.running.zero_()
        self.since = 0

    def checkpoint(self, on_checkpoint: Callable[[int], None] | None) -> None:
        """Check that nothing diverged, gather every rank's noise generator, then let rank 0
        write (``on_checkpoint``); a diverged state never overwrites the last good one."""
        self._check_finite(self.step)
        finite = torch.stack([p.detach().isfinite().all() for p in self.parameters]).all()
        if not bool(finite):
            raise TrainingDiverged(f"the weights stopped being finite by step {self.step}; the "
                                   f"last good checkpoint (step {self.last_checkpoint}) is kept")
        self._noise_states = self._gather_noise_states()
        if on_checkpoint is not None and self.dist.main:
            on_checkpoint(self.step)
        self.last_checkpoint = self.step

    def _gather_noise_states(self) -> list[torch.Tensor]:
        state = self.noise.get_state()
        if not self.dist.active:
            return [state]
        import torch.distributed as dist

        state = state.to(self.device)  # generator states live on the CPU; NCCL needs the GPU
        states = [torch.empty_like(state) for _ in range(self.dist.world)]
        dist.all_gather(states, state)
        return [s.cpu() for s in states]

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs besides the weights and EMA: (tensors, metadata)."""
        self._fold()
        tensors, optim_meta = optimizer_state(self.optim)
        tensors.update(prefixed("objective", self.objective.state_dict()))
        tensors["trainer.order"] = self.order
        tensors["trainer.running"] = self.running
        tensors["trainer.first_bad"] = self.first_bad
        tensors["rng.data"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        noise_states = getattr(self, "_noise_states", None) or self._gather_noise_states()
        if self.dist.active:
            for rank, value in enumerate(noise_states):
                tensors[f"rng.noise.{rank}"] = value
        meta = {
            "train_step": self.step,
            "micro": self.micro,
            "since": self.since,
            "world": self.dist.world,
            "optimizer": json.dumps(optim_meta),
            "log": {"steps": self.log.steps, "losses": self.log.losses},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        if self.post_hoc is not None:  # the power EMAs and their snapshots (post-hoc EMA)
            post_tensors, meta["post_hoc"] = self.post_hoc.state_dict()
            tensors.update(prefixed("post_hoc", post_tensors))
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state` (weights and EMA are loaded by the caller)."""
        if int(meta.get("world", 1)) != self.dist.world:
            raise ValueError(f"the checkpoint was written by {meta.get('world')} ranks; this run "
                             f"has {self.dist.world}: the data order would not continue")
        load_optimizer_state(self.optim, {k: v.to(self.device) for k, v in tensors.items()
                                          if k.startswith("optim.")},
                             json.loads(meta["optimizer"]))
        self.objective.load_state_dict({k: v.to(self.device)
                                        for k, v in unprefixed("objective", tensors).items()})
        self.order = tensors["trainer.order"].to(self.device)
        self.running = tensors["trainer.running"].to(self.device).clone()
        self.first_bad = tensors["trainer.first_bad"].to(self.device).clone()
        self.generator.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.dist.active:
            self.noise.set_state(tensors[f"rng.noise.{self.dist.rank}"])
        self.step = int(meta["train_step"])
        self.micro = int(meta["micro"])
        self.since = int(meta["since"])
        self.log = TrainLog(list(meta["log"]["steps"]), list(meta["log"]["losses"]))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        if self.post_hoc is not None:
            if "post_hoc" not in meta:
                raise ValueError("the checkpoint holds no power-EMA snapshots to continue "
                                 "(its run was trained without post-hoc EMA)")
            self.post_hoc.load_state_dict({k: v.to(self.device) for k, v in
                                           unprefixed("post_hoc", tensors).items()},
                                          meta["post_hoc"])
        self.last_checkpoint = self.step

    def _broadcast_parameters(self) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor, src=0)


def fit(
    model: ScoreModel,
    objective: Objective,
    data: torch.Tensor,
    optimizer: Optimizer,
    settings: TrainSettings,
    *,
    seed: int = 0,
    ema: EMA | None = None,
    on_log: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    post_hoc: PowerEMA | None = None,
) -> TrainLog:
    """Minimise ``objective`` over ``data`` for ``settings.steps`` (a one-shot :class:`Trainer`;
    ``post_hoc``: power-function EMAs updated each step, :class:`diffusers_kit.ema.PowerEMA`)."""
    trainer = Trainer(model, objective, data, optimizer, settings, seed=seed, ema=ema,
                      post_hoc=post_hoc)
    return trainer.run(settings.steps, on_log=on_log, on_checkpoint=on_checkpoint,
                       progress=progress)

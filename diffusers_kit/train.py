"""The training engine: minibatches, optimizer, gradient clipping, EMA, periodic checkpoints.

The loop keeps the running loss on the device and synchronises with the host only every
``log_every`` steps (to report it and to stop on a non-finite loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.objectives.base import Objective
from diffusers_kit.optim import Optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class EMA:
    """Exponential moving average of parameters: ``shadow <- decay * shadow + (1 - decay) * p``."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()],
                             1.0 - self.decay)

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


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def fit(
    model: ScoreModel,
    objective: Objective,
    data: torch.Tensor,
    optimizer: Optimizer,
    settings: TrainSettings,
    *,
    generator: torch.Generator,
    ema: EMA | None = None,
    on_log: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainLog:
    """Minimise ``objective`` over ``data`` (on the model's device) for ``settings.steps``."""
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optim = optimizer.create(parameters)
    n = data.shape[0]
    batch = min(settings.batch_size, n)
    per_epoch = n // batch
    order = torch.randperm(n, device=data.device, generator=generator)
    running = torch.zeros((), device=data.device)
    since = 0
    log = TrainLog()
    for step in range(1, settings.steps + 1):
        slot = (step - 1) % per_epoch
        if slot == 0 and step > 1:
            order = torch.randperm(n, device=data.device, generator=generator)
        x0 = data[order[slot * batch:(slot + 1) * batch]]
        loss = objective.loss(model, x0, generator)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optim.step()
        if ema is not None:
            ema.update(model.network)
        running += loss.detach()
        since += 1
        if step % settings.log_every == 0 or step == settings.steps:
            mean = float(running) / since  # the only host sync, every log_every steps
            if not math.isfinite(mean):
                raise TrainingDiverged(f"loss became {mean} by step {step}")
            log.steps.append(step)
            log.losses.append(mean)
            if on_log is not None:
                on_log(step, mean)
            running.zero_()
            since = 0
        if on_checkpoint is not None and settings.checkpoint_every and (
            step % settings.checkpoint_every == 0
        ):
            on_checkpoint(step)
        if progress is not None:
            progress(1)
    model.eval()
    return log

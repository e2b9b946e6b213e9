"""Training objectives (kind ``objective``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess


class Objective:
    """Base class of objectives: ``loss(model, x0, generator, labels)`` returns a scalar tensor.

    ``check(process, network)`` returns why the pair cannot be trained with this objective (the
    run graph reports it as a spec error before anything runs), or None.
    ``labels`` are class labels for class-conditional networks (None otherwise); an objective
    with ``needs_labels`` always gets them (the data set must have some). ``first_stage``: the
    objective trains an autoencoder of a spec's ``autoencoder`` section (its ``model.process``
    is None); every other objective trains a diffusion network.

    **Training hooks** (all optional; the defaults do nothing). An objective that needs more
    than the batch — a teacher model, a target network that trails the student — keeps it
    itself and the trainer drives it: :meth:`prepare` once before the first step (the trainer's
    constructor; a resumed run then loads :meth:`state_dict` back), :meth:`after_step` after
    every optimizer step, and :meth:`state_dict` / :meth:`load_state_dict` carry its tensors in
    checkpoints, so that a resumed run continues exactly.

    **Data parallel** (``torchrun``): ``ddp_ready = True`` declares that the loss evaluates
    the trained network only through ``model`` (its ``forward``, ``predict``, ``score``,
    ``eps``, ...: every call goes through :meth:`ScoreModel.forward`'s network evaluation),
    that its gradient is one ordinary backward (no gradients of gradients), and that a loss
    evaluated outside training (the trainer probes two examples, in eval mode, with a generator
    of its own, before the first step) changes nothing the training depends on. The trainer may then
    train through ``DistributedDataParallel``, whose bucketed all-reduce overlaps the backward
    pass. The default, False, is right for any objective: the trainer averages the gradients
    itself after backward (one all-reduce), which is correct whatever the loss does with the
    network (calls ``model.network`` directly, differentiates twice).
    """

    needs_labels: bool = False
    first_stage: bool = False  # trains an autoencoder (no process; reconstruction)
    differentiates_twice: bool = False  # grads of grads (torch.compile cannot do that)
    ddp_ready: bool = False  # may train through DistributedDataParallel (above)

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if network.prediction == "logits":
            return ("a denoising network: a classifier network is trained with objective "
                    "kind: classification")
        return None

    def prepare(self, model: ScoreModel) -> None:
        """Called once by the trainer before the first step (with the model it trains)."""

    def after_step(self, model: ScoreModel, step: int) -> None:
        """Called after optimizer step ``step`` (1-based), after the EMA updates."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's own tensors a resumed run needs (empty: none)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (called on resume, after :meth:`prepare`)."""

    def loss(self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def sum_dims(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.flatten(1).sum(1)


def mean_dims(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.flatten(1).mean(1)

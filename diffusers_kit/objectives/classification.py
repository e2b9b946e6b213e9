"""Training a noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

Guidance adds ``grad_x log p(y | x_t, t)`` to the unconditional score (Song et al. 2021, eq. 14),
so the classifier must know the label from *noised* inputs at every noise level: it is trained
with the cross-entropy ``-log p_phi(y | x_t, t)`` where ``x_t = alpha(t) x_0 + sigma(t) eps`` and
``t`` is drawn as for denoising score matching. Its minimiser is the Bayes posterior of the
label given the noised input, ``q(y | x_t) ∝ q(y) q_t(x_t | y)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.objectives.base import Objective
from diffusers_kit.objectives.dsm import sample_times

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks.base import Network
    from diffusers_kit.processes.base import NoiseProcess


class NoisyClassification(Objective):
    """Cross-entropy of a noise-aware classifier on noised inputs (Dhariwal & Nichol 2021).

    Args:
        times: ``levels`` (the process's discrete levels when it has some) or ``uniform`` in
            [t_min, 1].
        time: train at this one time only (overrides ``times``).
    """

    ddp_ready = True  # one forward through the model, one ordinary backward

    needs_labels = True

    def __init__(
        self,
        times: Literal["levels", "uniform"] = "levels",
        time: Annotated[float, Field(ge=0, le=1)] | None = None,
    ) -> None:
        self.times = times
        self.time = time

    def check(self, process: NoiseProcess, network: Network) -> str | None:
        if network.prediction != "logits":
            return "a classifier network (network kind: classifier) to train by classification"
        return None

    def loss(self, model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("classification needs class labels; this data set has none")
        n = x0.shape[0]
        if self.time is not None:
            t = torch.full((n,), float(self.time), device=x0.device)
        else:
            t = sample_times(model.process, n, self.times, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t, _ = model.process.marginal_sample(x0, t, noise)
        return torch.nn.functional.cross_entropy(model(x_t, t), labels.long())

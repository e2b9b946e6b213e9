"""Optimizers (kind ``optimizer``): small configs that create a ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import torch
from pydantic import Field

LearningRate = Annotated[float, Field(gt=0, le=100)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Epsilon = Annotated[float, Field(gt=0, le=1)]
WeightDecay = Annotated[float, Field(ge=0, le=100)]


class Optimizer:
    """Base class of optimizer configs: ``create(parameters) -> torch.optim.Optimizer``."""

    def create(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015)."""

    def __init__(self, lr: LearningRate = 1e-3, beta1: Beta = 0.9, beta2: Beta = 0.999,
                 eps: Epsilon = 1e-8, weight_decay: WeightDecay = 0.0) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, (beta1, beta2), eps, weight_decay

    def create(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=self.weight_decay)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""

    def __init__(self, lr: LearningRate = 1e-3, beta1: Beta = 0.9, beta2: Beta = 0.999,
                 eps: Epsilon = 1e-8, weight_decay: WeightDecay = 0.01) -> None:
        super().__init__(lr, beta1, beta2, eps, weight_decay)

    def create(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)


REGISTER = [
    ("optimizer", "adam", Adam),
    ("optimizer", "adamw", AdamW),
]

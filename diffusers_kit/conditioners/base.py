"""Conditioners (kind ``conditioner``): a class label -> a context sequence for cross-attention.

A conditioner turns the condition of each sample into a sequence of ``tokens`` vectors of width
``dim``, which a U-Net with transformer blocks attends to (Rombach et al. 2022, sec. 3.3:
``Attention(Q, K, V)`` with ``Q = W_Q phi(z_t)``, ``K = W_K tau(y)``, ``V = W_V tau(y)``;
``tau`` is the conditioner). Conditions are class labels ``y`` in ``0 .. num_classes - 1``;
label ``num_classes`` is the null condition (what ``y=None`` means), whose context is what
classifier-free guidance uses for the unconditional prediction.
"""

from __future__ import annotations

import torch


class Conditioner(torch.nn.Module):
    """Base class of conditioners: ``forward(y, batch, device) -> (batch, tokens, dim)``.

    ``num_classes``, ``tokens`` and ``dim`` are set by the constructor. ``drop_prob``: in
    training, each label is replaced by the null label with this probability (the network's
    ``class_dropout``, set by the network that owns the conditioner), so that one network learns
    the conditional and the unconditional prediction (Ho & Salimans 2022).
    """

    num_classes: int = 0
    tokens: int = 1
    dim: int = 64
    drop_prob: float = 0.0

    @property
    def null_class(self) -> int:
        return self.num_classes

    def labels(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """``y`` as long labels, the null label for ``y=None``, with training-time dropout."""
        if y is None:
            return torch.full((batch,), self.null_class, device=device, dtype=torch.long)
        y = y.long().to(device)
        if self.training and self.drop_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.drop_prob
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return y

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

"""Class tokens: each class label -> its own sequence of learned vectors (conditioner
``class_tokens``).

The context of label ``c`` is ``E[c] + P``: ``E[c]`` is a learned ``(tokens, dim)`` table row per
class (the class-embedding conditioner ``tau`` of Rombach et al. 2022's class-conditional LDMs,
widened to several tokens), ``P`` a learned positional component shared by every label, so the
tokens of a sequence are told apart by the cross-attention even where two classes agree.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.conditioners.base import Conditioner


class ClassTokens(Conditioner):
    """Label ``c`` -> ``tokens`` learned vectors of width ``dim`` (plus learned positions).

    ``E[c] ~ N(0, 1)`` at first, ``P ~ N(0, 0.02^2)``. The null label (``num_classes``, what
    ``y=None`` and label dropout give) has its own row of ``E``, which **starts at zero** (its
    context is then the positional component alone, as the null class embedding of the DDPM U-Net
    starts at zero) and is learned like the others from the dropped labels.

    Args:
        num_classes: number of classes (labels ``0 .. num_classes - 1``; ``num_classes`` is the
            null label).
        tokens: context length: learned vectors per label.
        dim: width of each context vector (the cross-attention's key / value input width).
    """

    def __init__(
        self,
        num_classes: Annotated[int, Field(ge=1, le=100_000)] = 10,
        tokens: Annotated[int, Field(ge=1, le=256)] = 4,
        dim: Annotated[int, Field(ge=1, le=4096)] = 64,
    ) -> None:
        super().__init__()
        if num_classes * tokens * dim > 2**28:  # 1 GiB of float32 for the table
            raise ValueError(f"class_tokens table of num_classes x tokens x dim = {num_classes} x "
                             f"{tokens} x {dim} values is over 2^28; use fewer tokens or a "
                             "smaller dim")
        self.num_classes = num_classes
        self.tokens = tokens
        self.dim = dim
        table = torch.randn(num_classes + 1, tokens, dim)
        table[num_classes] = 0.0
        self.table = torch.nn.Parameter(table)
        self.positions = torch.nn.Parameter(0.02 * torch.randn(tokens, dim))

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, tokens, dim)``: ``E[y] + P``, the null label's for ``y=None``."""
        labels = self.labels(y, batch, device)
        return self.table[labels] + self.positions


__all__ = ["ClassTokens"]

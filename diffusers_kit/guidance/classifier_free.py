"""Classifier-free guidance (Ho & Salimans 2022), with rescale (Lin et al. 2023) and a guidance
interval (Kynkäänniemi et al. 2024). Kind ``guidance``, name ``classifier_free``.

A class-conditional network trained with label dropout (``network.class_dropout``) predicts both
the conditional ``eps(x_t, y)`` and the unconditional ``eps(x_t)`` (the null label). The guided
prediction is

    eps_w = eps(x_t) + w (eps(x_t, y) - eps(x_t))

in whatever the network predicts: the combination's weights sum to one and the conversions
between eps, score, x0 and v are affine at a fixed ``x_t``, so the same ``w`` gives the same
guided score in every parameterisation. ``w = 0`` is unconditional, ``w = 1`` conditional,
``w > 1`` extrapolates. In score terms, ``score_w = score(x_t) + w grad log p_t(y | x_t)`` — the
implicit classifier raised to the power ``w`` — so for ``w > 1`` the samples concentrate where
the class is most certain: this is **not** the posterior ``p(x | y)``, it is a sharper
distribution (the price of the fidelity / diversity trade-off). Ho & Salimans write the same
rule as ``(1 + w') eps(x_t, y) - w' eps(x_t)``: their ``w'`` is our ``w - 1``.

Both passes are **one** network call on the doubled batch ``[x; x]`` with labels ``[y; null]``.
A learned variance keeps the conditional half's variance output (as GLIDE does).

**Rescale** ``phi`` (Lin et al. 2023, sec. 3.4) counters the over-saturation of large ``w``: the
guided denoised image ``x0_w`` is scaled to the per-sample standard deviation of the conditional
one, and mixed, ``x0 = phi * x0_w * std(x0_c) / std(x0_w) + (1 - phi) * x0_w``. It is applied to
the x0 prediction (the image, whose statistics over-saturate), then converted back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.guidance.base import Evaluate, Guidance, Interval

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel


class ClassifierFree(Guidance):
    """``eps_u + w (eps_c - eps_u)`` from one class-conditional network (Ho & Salimans 2022).

    Args:
        scale: the guidance weight ``w`` (0: unconditional, 1: conditional, > 1: sharper).
        rescale: ``phi`` in [0, 1], the std rescale of Lin et al. 2023 (0: off).
        interval: guide only for noise levels ``sigma/alpha`` in ``[lo, hi]``; elsewhere the
            plain conditional prediction is used (Kynkäänniemi et al. 2024).
    """

    def __init__(self, scale: Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)] = 3.0,
                 rescale: Annotated[float, Field(ge=0, le=1)] = 0.0,
                 interval: Interval | None = None) -> None:
        super().__init__(interval)
        self.scale = scale
        self.rescale = rescale

    def check(self, model: ScoreModel) -> str | None:
        if getattr(model.network, "num_classes", None) is None:
            return ("a class-conditional network (network.num_classes, trained with "
                    "class_dropout > 0 so that it also knows the unconditional score)")
        if not getattr(model.network, "class_dropout", 0.0) > 0:
            return ("a network trained with network.class_dropout > 0 (with 0 its null label "
                    "never trained, so it has no unconditional prediction to guide with)")
        return None

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        if y is None:  # nothing requested: the unconditional model, unguided
            return evaluate(x, t, None)
        null = torch.full_like(y, int(model.network.num_classes))
        both = evaluate(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        conditional, unconditional = both.chunk(2)
        cond, v = model.split(conditional)
        uncond, _ = model.split(unconditional)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            guided = self._rescaled(model, guided, cond, x, t)
        return guided if v is None else torch.cat([guided, v], dim=1)

    def _rescaled(self, model: ScoreModel, guided: torch.Tensor, cond: torch.Tensor,
                  x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0_w = model.convert(guided, x, t, "x0")
        x0_c = model.convert(cond, x, t, "x0")
        dims = tuple(range(1, x.dim()))
        ratio = x0_c.std(dim=dims, keepdim=True) / x0_w.std(dim=dims, keepdim=True).clamp_min(
            torch.finfo(x0_w.dtype).tiny)
        x0 = self.rescale * ratio * x0_w + (1 - self.rescale) * x0_w
        return model.process.convert(x0, x, t.to(x.dtype), "x0", model.network.prediction)


__all__ = ["ClassifierFree"]

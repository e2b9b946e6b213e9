"""Negative log-likelihood in bits per dimension on held-out data (kind ``metric``, ``nll``).

The probability-flow ODE gives an exact likelihood (:mod:`diffusers_kit.likelihood`; Song et
al. 2021, section 4.3); quantised data are uniformly dequantized first, so the number bounds the
discrete data's code length. Optionally the DDPM variational bound (Ho et al. 2020) is reported
beside it as a second, independent estimate.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.likelihood import bits_per_dim, dequantize, log_likelihood, variational_bound
from diffusers_kit.metrics.base import Metric

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

EXACT_TRACE_MAX_DIM = 16


class NegativeLogLikelihood(Metric):
    """Bits/dim of held-out data through the probability-flow ODE (and the DDPM bound).

    Args:
        n: held-out examples to evaluate (the first n).
        divergence: ``exact`` trace, ``hutchinson`` estimate, or ``auto`` (exact up to 16 dims).
        probe: Hutchinson probes: ``rademacher`` or ``gaussian``.
        method: scipy integrator.
        rtol: relative tolerance.
        atol: absolute tolerance.
        bins: levels of the quantised data (256 for 8-bit; 17 for the digits); null: continuous.
        low: value of the lowest level.
        high: value of the highest level.
        vlb: also report the DDPM variational bound in bits/dim (one evaluation per step).
        vlb_steps: steps of the bound (default: the process's own, or 1000).
    """

    def __init__(
        self,
        n: Annotated[int, Field(ge=1, le=1_000_000)] = 128,
        divergence: Literal["auto", "exact", "hutchinson"] = "auto",
        probe: Literal["rademacher", "gaussian"] = "rademacher",
        method: Literal["RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"] = "RK45",
        rtol: Annotated[float, Field(gt=0, le=1)] = 1e-5,
        atol: Annotated[float, Field(gt=0, le=1)] = 1e-5,
        bins: Annotated[int, Field(ge=2, le=65_536)] | None = 256,
        low: Annotated[float, Field(ge=-1e6, le=1e6)] = -1.0,
        high: Annotated[float, Field(ge=-1e6, le=1e6)] = 1.0,
        vlb: bool = False,
        vlb_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None,
    ) -> None:
        if high <= low:
            raise ValueError(f"high ({high}) must exceed low ({low})")
        self.n = n
        self.divergence = divergence
        self.probe = probe
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.bins = bins
        self.low = low
        self.high = high
        self.vlb = vlb
        self.vlb_steps = vlb_steps

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        if model is None:
            raise ValueError("the nll metric needs the trained model")
        device = next(iter(model.parameters()), torch.empty(0)).device
        x_cpu = data.heldout[: self.n].float().cpu()
        dims = x_cpu[0].numel()
        x_eval = x_cpu if self.bins is None else dequantize(x_cpu, self.bins, self.low,
                                                            self.high, generator=generator)
        x, x_eval = x_cpu.to(device), x_eval.to(device)
        divergence = self.divergence
        if divergence == "auto":
            divergence = "exact" if dims <= EXACT_TRACE_MAX_DIM else "hutchinson"
        probe_generator = torch.Generator(device).manual_seed(generator.initial_seed())
        result = log_likelihood(model, x_eval, divergence=divergence, probe=self.probe,
                                method=self.method, rtol=self.rtol, atol=self.atol,
                                generator=probe_generator)
        bpd = bits_per_dim(result.log_prob.double(), dims, self.bins, self.low, self.high)
        out = {
            "nll_bpd": float(bpd.mean()),
            "nll_bpd_se": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
            "nll_nfe": float(result.nfe),
            "nll_n": float(len(bpd)),
        }
        if self.vlb:
            bound = variational_bound(model, x, steps=self.vlb_steps, bins=self.bins,
                                      generator=probe_generator)
            out["vlb_bpd"] = float((bound.double() / (dims * math.log(2.0))).mean())
        return out

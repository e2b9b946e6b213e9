"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", section 5 and Table 1) around any network, on any process.

In the noise-level view of a process, ``x_t / alpha = x0 + s eps`` with ``s = sigma / alpha``,
the denoiser is

    D(x_t, t) = c_skip(s) x_t / alpha + c_out(s) F(c_in(s) x_t / alpha, c_noise(s))

    c_skip = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s sigma_data / sqrt(s^2 + sigma_data^2),
    c_in = 1 / sqrt(s^2 + sigma_data^2),           c_noise = ln(s) / 4

so that ``F``'s input and its training target ``(x0 - c_skip x / alpha) / c_out`` have unit
variance for data of standard deviation ``sigma_data``, and EDM's weighting ``lambda(s) = 1 /
c_out^2`` (:class:`diffusers_kit.objectives.denoising.EDMLoss`) makes ``F``'s own error weigh 1.
The wrapper predicts ``x0``. Multiplied through by ``alpha`` the coefficients stay finite where
``alpha = 0`` (a path to pure noise: there ``D = sigma_data F(x / sigma, c_noise)``), so they are
computed as ``c_skip / alpha = sigma_data^2 alpha / (sigma^2 + alpha^2 sigma_data^2)``,
``c_in / alpha = 1 / sqrt(sigma^2 + alpha^2 sigma_data^2)``, ``c_out = sigma sigma_data /
sqrt(sigma^2 + alpha^2 sigma_data^2)``; ``ln s`` is clamped to ``[-20, 20]`` (finite at
``alpha = 0``).

The process is bound when the network joins a model (``ScoreModel`` calls
:meth:`EDMPrecond.bind_process`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import expand

if TYPE_CHECKING:
    from diffusers_kit.processes.base import NoiseProcess

LOG_LEVEL_CLAMP = 20.0


def edm_coefficients(alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip / alpha, c_out, c_in / alpha, c_noise)`` of Karras et al. 2022, Table 1, at
    ``s = sigma / alpha``, in the finite form of the module docstring (the factors that act on
    ``x_t`` itself)."""
    sd2 = sigma_data**2
    norm = sigma**2 + alpha**2 * sd2  # alpha^2 (s^2 + sigma_data^2)
    root = norm.sqrt()
    log_level = (sigma.log() - alpha.log()).clamp(-LOG_LEVEL_CLAMP, LOG_LEVEL_CLAMP)
    return sd2 * alpha / norm, sigma * sigma_data / root, 1.0 / root, 0.25 * log_level


class EDMPrecond(Network):
    """EDM's preconditioned denoiser around ``network`` (its output is ``F``; its own
    ``prediction`` is not used): predicts ``x0`` on any process (Karras et al. 2022, Table 1).

    Args:
        network: the network ``F`` (any dkit network; a class-conditional one gets the labels).
        sigma_data: the data's standard deviation (Karras et al. 2022: 0.5).
    """

    dkit_context = ("data_shape",)

    def __init__(
        self,
        network: Network,
        sigma_data: Annotated[float, Field(gt=0, le=1e6)] = 0.5,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__("x0")
        if network.learned_variance:
            raise ValueError("edm_precond wraps a network without learned_variance")
        self.network = network
        self.sigma_data = float(sigma_data)
        self.data_shape = tuple(data_shape or getattr(network, "data_shape", ()) or ())
        self.num_classes = network.num_classes
        self.class_dropout = network.class_dropout
        self.process: NoiseProcess | None = None

    def bind_process(self, process: NoiseProcess) -> None:
        """The process whose ``(alpha, sigma)`` set the coefficients."""
        self.process = process

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self.process is None:
            raise RuntimeError("edm_precond is used outside a model: bind_process(process) "
                               "first (ScoreModel does)")
        tt = t if t.device.type == "mps" else t.double()
        alpha, sigma = self.process.marginal(tt)
        skip, out, scale_in, noise = (c.to(x.dtype) for c in edm_coefficients(
            alpha, sigma, self.sigma_data))
        inner = expand(scale_in, x) * x
        if self.num_classes is not None:
            output = self.network(inner, noise, y)
        else:
            output = self.network(inner, noise)
        return expand(skip, x) * x + expand(out, x) * output

    def describe(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data}) around {self.network.describe()}"

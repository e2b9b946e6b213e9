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

**Consistency boundary** (network ``consistency_precond``, :class:`ConsistencyPrecond`; Song,
Dhariwal, Chen & Sutskever 2023, "Consistency Models", section 3 and Appendix C): a consistency
function must satisfy ``f(x, epsilon) = x`` at the smallest noise level ``epsilon``. With
``s_min = sigma / alpha`` at the process's ``t_min`` the skip and output coefficients become

    c_skip = sigma_data^2 / ((s - s_min)^2 + sigma_data^2),
    c_out  = (s - s_min) sigma_data / sqrt(s^2 + sigma_data^2)

(``c_in``, ``c_noise`` as above), applied to ``y = x_t / alpha``: ``f(x, t_min) = x /
alpha(t_min)`` exactly (``c_skip = 1``, ``c_out = 0`` in floating point), which is ``x`` itself
on the VE / EDM process (``alpha = 1``). Below ``s_min`` the offset is clamped at 0 (``f`` is the
identity there too). It needs ``alpha > 0`` on the whole path.

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


def consistency_coefficients(level: torch.Tensor, level_min: torch.Tensor, sigma_data: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of Song et al. 2023, Appendix C, at the noise level ``level = sigma /
    alpha`` with the boundary ``level_min``: ``c_skip(level_min) = 1`` and ``c_out(level_min) = 0``
    exactly (the offset is clamped at 0 below the boundary)."""
    sd2 = sigma_data**2
    offset = (level - level_min).clamp_min(0.0)
    return sd2 / (offset**2 + sd2), offset * sigma_data / (level**2 + sd2).sqrt()


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
        alpha, sigma = self._marginal(t)
        skip, out, scale_in, noise = (c.to(x.dtype) for c in edm_coefficients(
            alpha, sigma, self.sigma_data))
        inner = expand(scale_in, x) * x
        return expand(skip, x) * x + expand(out, x) * self._inner(inner, noise, y)

    def _marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at ``t`` in float64 (float32 on MPS)."""
        if self.process is None:
            raise RuntimeError(f"{type(self).__name__} is used outside a model: "
                               "bind_process(process) first (ScoreModel does)")
        return self.process.marginal(t if t.device.type == "mps" else t.double())

    def _inner(self, inner: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None
               ) -> torch.Tensor:
        """``F(inner, c_noise)`` (with the labels for a class-conditional ``F``)."""
        if self.num_classes is not None:
            return self.network(inner, noise, y)
        return self.network(inner, noise)

    def describe(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data}) around {self.network.describe()}"


class ConsistencyPrecond(EDMPrecond):
    """EDM's wrapper with the consistency boundary (Song et al. 2023, Appendix C; see the module
    doc): ``f(x, t) = c_skip(s) x / alpha + c_out(s) F(c_in(s) x / alpha, c_noise(s))`` with
    ``c_skip(s_min) = 1`` and ``c_out(s_min) = 0``, so ``f(x, t_min) = x / alpha(t_min)``
    exactly. Its parameters are ``edm_precond``'s around the same ``F``: a consistency model
    can start from an EDM teacher's weights.

    Args:
        network: the network ``F`` (any dkit network).
        sigma_data: the data's standard deviation.

    ``consistency_boundary = True`` tells the ``consistency_distillation`` objective that the
    network satisfies the boundary condition (a plugin network that does says so the same way).
    """

    consistency_boundary = True

    def bind_process(self, process: NoiseProcess) -> None:
        """The process (it must keep ``alpha > 0``: the boundary is set in ``x / alpha``)."""
        alpha = process.alpha(torch.ones(1, dtype=torch.float64))
        if float(alpha[0]) <= 0.0:
            raise ValueError("consistency_precond needs alpha > 0 on the whole path (this "
                             "process reaches pure noise at t = 1)")
        super().bind_process(process)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``s_min`` comes from ``t_min`` rounded to ``t``'s dtype, the way ``s`` comes from
        ``t``, so that ``t = t_min`` gives ``s - s_min = 0`` exactly."""
        alpha, sigma = self._marginal(t)
        assert self.process is not None
        t_min = torch.full((1,), float(self.process.t_min), dtype=t.dtype, device=t.device)
        a_min, s_min = self._marginal(t_min)
        level = sigma / alpha
        skip, out = (c.to(x.dtype) for c in consistency_coefficients(
            level, s_min / a_min, self.sigma_data))
        _, _, scale_in, noise = (c.to(x.dtype) for c in edm_coefficients(
            torch.ones_like(level), level, self.sigma_data))
        scaled = x / expand(alpha.to(x.dtype), x)
        inner = expand(scale_in, x) * scaled
        return expand(skip, x) * scaled + expand(out, x) * self._inner(inner, noise, y)

    def describe(self) -> str:
        return (f"ConsistencyPrecond(sigma_data={self.sigma_data}) around "
                f"{self.network.describe()}")

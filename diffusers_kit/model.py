"""A network bound to a noise process: the score / eps / x0 views solvers and objectives use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffusers_kit.networks.base import Network
from diffusers_kit.processes.base import NoiseProcess

if TYPE_CHECKING:
    from diffusers_kit.autoencoders.base import Autoencoder
    from diffusers_kit.guidance.base import Evaluate, Guidance


class NetworkOutputError(ValueError):
    """A network's output does not have the shape its input asks for (see
    :func:`check_network_output`)."""


def expected_output_shape(network: Network, input_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The output shape ``network`` must return for an input of ``input_shape``: the same shape,
    with twice the channels (dimension 1) for a ``learned_variance`` network; None where the
    output is not a per-element prediction (``logits`` of a classifier, an autoencoder's
    ``reconstruction``)."""
    if network.prediction in ("logits", "reconstruction"):
        return None
    shape = tuple(int(n) for n in input_shape)
    if network.learned_variance:
        return (shape[0], 2 * shape[1], *shape[2:])
    return shape


def check_network_output(network: Network, x: torch.Tensor, out: torch.Tensor) -> None:
    """Raise :class:`NetworkOutputError` naming the network when ``out`` (its output at ``x``)
    is not of :func:`expected_output_shape`. Without it a (B, 1) output for (B, 2) data
    broadcasts through every loss and solver step and trains and samples silently wrong."""
    expected = expected_output_shape(network, x.shape)
    if expected is None or tuple(out.shape) == expected:
        return
    variance = " (twice the channels: it learns its variance)" if network.learned_variance else ""
    raise NetworkOutputError(
        f"network {type(network).__module__}.{type(network).__qualname__} returned "
        f"an output of shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; a "
        f"network predicting {network.prediction!r} must return shape {expected}{variance}")


class ScoreModel(torch.nn.Module):
    """``network`` interpreted through ``process``.

    The network predicts ``network.prediction``; :meth:`predict` converts it (through
    :meth:`NoiseProcess.convert`) so that callers never care which parameterisation was trained.
    A network with ``learned_variance`` outputs twice the data's channels (dimension 1): the
    prediction, then the variance output ``v``; :meth:`split` separates them and the conversions
    use the prediction only. ``y`` (class labels) is passed to class-conditional networks only.
    ``nfe`` counts network evaluations (a host integer: counting needs no device sync); a
    batched call counts once, whatever its batch.

    **Guidance** is composed here and nowhere else: :meth:`guided` returns a view of the same
    network with guidance terms (:mod:`diffusers_kit.guidance`) and the requested labels bound
    in. Its :meth:`forward` is the guided output, so :meth:`predict`, :meth:`score` and
    :meth:`eps` — everything a solver calls — are guided, and no solver knows about it.

    ``autoencoder``: set for a latent diffusion model (:mod:`diffusers_kit.latent`): the
    network works on the autoencoder's latents, and the terms that measure images (DPS) measure
    ``decode(x0_hat)``.
    """

    def __init__(self, process: NoiseProcess, network: Network) -> None:
        super().__init__()
        self.process = process
        self.network = network
        if hasattr(network, "bind_process"):  # a wrapper set by the process (edm_precond)
            network.bind_process(process)
        self.nfe = 0
        self.guidance: tuple[Guidance, ...] = ()
        self.labels: torch.Tensor | None = None
        self.measurements: torch.Tensor | None = None
        self.autoencoder: Autoencoder | None = None
        self._evaluate: Evaluate = self._network_output
        # what the network is called through (None: the network itself): see through()
        object.__setattr__(self, "_call", None)

    def through(self, wrapper: torch.nn.Module) -> ScoreModel:
        """A view of this model (same network, process, guidance and labels) whose network
        evaluations call ``wrapper``, a module around this very network that returns its
        output: ``DistributedDataParallel``, which must see every forward of a step to reduce
        the gradients during backward. The network's attributes are still read from the
        network, and the wrapper is not a submodule (state dicts do not change)."""
        view = self.guided(self.guidance, self.labels, self.measurements)
        object.__setattr__(view, "_call", wrapper)
        return view

    def guided(self, guidance: Sequence[Guidance] = (), labels: torch.Tensor | None = None,
               measurements: torch.Tensor | None = None) -> ScoreModel:
        """This model with ``guidance`` terms applied (in order: the first wraps the network)
        and ``labels`` (one per sample of the batches it will be called on; None: no label)
        bound as the condition, and ``measurements`` (one ``y`` per sample) for the terms that
        condition on a measurement. The network and process are shared, not copied."""
        view = ScoreModel(self.process, self.network)
        view.train(self.training)
        view.autoencoder = self.autoencoder
        view.guidance = tuple(guidance)
        view.labels = labels
        view.measurements = measurements
        evaluate: Evaluate = view._network_output
        for term in view.guidance:
            evaluate = term.wrap(evaluate, view)
        view._evaluate = evaluate
        return view

    def _network_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
                        ) -> torch.Tensor:
        # every sampler step comes through here: the counter and the network are read and
        # written past nn.Module's __setattr__ / __getattr__ (a plain int attribute and a
        # registered submodule; the same objects, ~1-3 us less per evaluation)
        object.__setattr__(self, "nfe", self.nfe + 1)
        network = self._modules["network"]
        if t.dtype != x.dtype:
            t = t.to(x.dtype)
        call = network if self._call is None else self._call
        if getattr(network, "num_classes", None) is not None:
            out = call(x, t, y)
        else:
            out = call(x, t)
        if out.shape != x.shape:  # one comparison per call; the exceptions are looked up then
            check_network_output(network, x, out)
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Network output at ``(x_t, t)`` (both halves for a learned-variance network), guided
        when this is a :meth:`guided` view; ``y`` defaults to the bound labels."""
        if y is None and self.labels is not None:
            y = self.labels
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"{y.shape[0]} labels bound for a batch of {x.shape[0]}")
            y = y.to(x.device)
        return self._evaluate(x, t, y)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prediction, v)``: ``v`` is None unless the network learns its variance."""
        if self._modules["network"].learned_variance:
            prediction, v = output.chunk(2, dim=1)
            return prediction, v
        return output, None

    def convert(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, target: str,
                marginal: tuple[float | torch.Tensor, float | torch.Tensor] | None = None
                ) -> torch.Tensor:
        """The network's ``prediction`` half converted to ``target`` (``marginal``: ``(alpha,
        sigma)`` at ``t`` when the caller has them; see :meth:`NoiseProcess.convert`)."""
        source = self._modules["network"].prediction
        if source == target:  # nothing to convert (process.convert would return it as well)
            return prediction
        return self.process.convert(prediction, x, t.to(x.dtype), source, target,
                                    marginal=marginal)

    def predict(self, x: torch.Tensor, t: torch.Tensor, target: str,
                y: torch.Tensor | None = None, *,
                marginal: tuple[float | torch.Tensor, float | torch.Tensor] | None = None
                ) -> torch.Tensor:
        """The network's prediction converted to ``target`` (``eps``, ``score``, ``x0``, ``v``).
        A sampler passes ``marginal = (alpha(t), sigma(t))`` from its cached grid (one ``t``
        for the whole batch), so that a step does no schedule work."""
        prediction, _ = self.split(self(x, t, y))
        return self.convert(prediction, x, t, target, marginal)

    def score(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
              ) -> torch.Tensor:
        """``s_theta(x_t, t) ~ grad log q_t(x_t)``."""
        return self.predict(x, t, "score", y)

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
            ) -> torch.Tensor:
        return self.predict(x, t, "eps", y)

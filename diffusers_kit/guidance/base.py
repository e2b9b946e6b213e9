"""Guidance terms (kind ``guidance``): what conditional sampling adds to a model's prediction.

Conditional sampling rests on Bayes' rule for scores (Song et al. 2021, eq. 14)::

    grad log p_t(x_t | y) = grad log p_t(x_t) + grad log p_t(y | x_t)

A guidance term changes the model's prediction at ``(x_t, t)`` for the requested labels ``y``.
Terms are composed **once**, inside :class:`~diffusers_kit.model.ScoreModel` (see
:meth:`ScoreModel.guided`): every solver asks the model for a score, an eps or an x0 as it always
does and receives the guided one, so no solver knows about guidance. A list of terms nests: the
first wraps the network, the next wraps the first, and so on (gradient terms add up).

A term sees the model through one function, ``evaluate(x, t, y) -> output``: the raw output of
the network (or of the terms inside it) in the network's own parameterisation (its
``prediction``: eps, score, x0, v), both halves for a learned-variance network. It returns an
output of the same form. Two shapes of term are common, and each has a base class here:

- :class:`Guidance` itself, for **prediction terms** that recombine outputs with no gradient
  (classifier-free guidance: two labels, one batched call);
- :class:`GradientGuidance`, for **gradient terms** ``+ scale * grad_x log p(y | x_t)`` in score
  space (a noise-aware classifier; a measurement through a forward model). The score increment
  is turned into the network's parameterisation by the process's conversion, which is linear in
  the prediction at a fixed ``x_t`` (so the increment converts on its own, with ``x_t = 0``).
  Autograd is switched on only inside these terms.

**Guidance interval** (Kynkäänniemi et al. 2024): every term takes ``interval: [lo, hi]`` and acts
only while the noise level ``sigma(t) / alpha(t)`` (the EDM sigma, the same scale for every
process) lies in ``[lo, hi]``; elsewhere the term is skipped and the output is exactly the
unguided one. On the CPU the decision is made on the host, so a step outside the interval costs
one plain network call; on an accelerator (where reading ``t`` back would stall the queue) the
guided and unguided outputs are selected per sample on the device (a gradient term reuses the
unguided output; classifier-free guidance pays one extra conditional pass there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

Evaluate = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``evaluate(x, t, y)``: a model output at ``(x_t, t)`` for labels ``y`` (or None)."""

NoiseLevel = Annotated[float, Field(ge=0, le=float("inf"), allow_inf_nan=True)]
Interval = tuple[NoiseLevel, NoiseLevel]


MOVE = ("alpha_t", "sigma_t", "alpha_s", "sigma_s", "c_t", "c_0", "posterior_var")
"""What :meth:`Guidance.step` gets for the move ``t -> s`` (floats): the marginals
``x_t = alpha_t x_0 + sigma_t eps`` at both ends (``sigma_s = 0`` on the last move) and
``q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, posterior_var I)``."""


def decide_on_host(x: torch.Tensor) -> bool:
    """Whether the interval is decided on the host (free on the CPU) rather than per sample on
    the device (no synchronisation: both outputs are computed and one is selected)."""
    return x.device.type == "cpu"


def noise_level(model: ScoreModel, t: torch.Tensor) -> torch.Tensor:
    """``sigma(t) / alpha(t)``: the noise-to-signal ratio (the EDM sigma) of each sample."""
    alpha, sigma = model.process.marginal(t)
    return sigma / alpha


class Guidance:
    """Base class of guidance terms: ``apply(evaluate, model, x, t, y)`` returns the guided
    output (the network's parameterisation) from the inner ``evaluate``.

    Capabilities a term declares (read by the run graph, never guessed):
    ``needs_labels`` — it is meaningless without requested labels (``sample.labels``);
    ``differentiates`` — it takes gradients (autograd is on inside it);
    ``needs_measurement`` — it conditions on a measurement ``y`` per sample (an inverse problem:
    :mod:`diffusers_kit.guidance.measurement`), bound with the model like labels.

    Args:
        interval: act only for noise levels ``sigma/alpha`` in ``[lo, hi]`` (default: always).
    """

    needs_labels: bool = True
    differentiates: bool = False
    needs_measurement: bool = False
    takes_step: bool = False
    """The term is a sampler's move of its own (DDRM: a DDIM-like step in the operator's SVD
    basis, with its own noise per direction), which no change of the prediction can express.
    A solver that honours it (class attribute ``takes_term_steps``: DDIM) asks the term for
    each move with :meth:`step` instead of taking its own; every other solver refuses such a
    term by name (:meth:`Solver.sample <diffusers_kit.solvers.base.Solver.sample>`, and the
    run graph on ``restore.solver.kind``)."""

    def __init__(self, interval: Interval | None = None) -> None:
        if interval is not None:
            lo, hi = float(interval[0]), float(interval[1])
            if not lo <= hi:
                raise ValueError(f"interval [{lo}, {hi}]: the low end must not exceed the high")
            interval = (lo, hi)
        self.interval = interval

    def check(self, model: ScoreModel) -> str | None:
        """Why this term cannot guide ``model`` (its network and process), or None if it can."""
        return None

    def step(self, model: ScoreModel, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             move: Mapping[str, float],
             randn_like: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """For a term with ``takes_step``: the state at the next time ``s`` from ``x`` at ``t``
        (a ``(B,)`` tensor), given the solver's denoised estimate ``x0`` there (the guided
        prediction, clipped as the solver clips), the move's scalars ``move`` (:data:`MOVE`)
        and the solver's source of noise (``randn_like``; None on the last move)."""
        raise NotImplementedError(f"{type(self).__name__} takes no step of its own")

    def num_classes(self) -> int | None:
        """How many classes this term knows, when it knows (a classifier's outputs)."""
        return None

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        """The guided output at ``(x, t)`` for labels ``y``; ``evaluate`` is the output inside."""
        raise NotImplementedError

    def wrap(self, evaluate: Evaluate, model: ScoreModel) -> Evaluate:
        """``evaluate`` with this term applied (inside its interval only)."""
        if self.interval is None:
            return lambda x, t, y: self.apply(evaluate, model, x, t, y)
        lo, hi = self.interval

        def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            level = noise_level(model, t)
            inside = (level >= lo) & (level <= hi)
            if decide_on_host(x):  # reading t costs nothing here: skip what is not needed
                if bool(inside.all()):
                    return self.apply(evaluate, model, x, t, y)
                if not bool(inside.any()):
                    return evaluate(x, t, y)
            plain = evaluate(x, t, y)

            def reuse(x2: torch.Tensor, t2: torch.Tensor, y2: torch.Tensor | None
                      ) -> torch.Tensor:  # a term asking for the plain output gets it again
                same = x2 is x and t2 is t and y2 is y
                return plain if same else evaluate(x2, t2, y2)

            mask = inside.reshape(-1, *([1] * (x.dim() - 1)))
            return torch.where(mask, self.apply(reuse, model, x, t, y), plain)

        return guided

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class TakesStep:
    """For a term that conditions in its own moves (``takes_step``: DDRM, DDNM+) rather than in
    the prediction: its guided output is the unconditional one, and the solver asks its
    :meth:`Guidance.step` for each move. Put it before the term's guidance base class."""

    takes_step = True

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        """The unconditional prediction: the measurement enters in :meth:`Guidance.step`."""
        return evaluate(x, t, y)


class GradientGuidance(Guidance):
    """A term ``+ scale * grad_x log p(y | x_t)`` added to the model's score.

    Subclasses implement :meth:`gradient` (``grad_x log p(y | x_t)``, per sample, the shape of
    ``x``); this class adds it in score space and converts the increment to the network's
    parameterisation: ``d eps = -sigma d score``, ``d x0 = sigma^2 / alpha d score``, ... (the
    process's conversion, applied to the increment alone because it is linear in the
    prediction at fixed ``x_t``). A learned variance passes through unchanged.

    Args:
        scale: the guidance scale ``s`` (1: Bayes' rule exactly; Dhariwal & Nichol 2021, alg. 1).
        interval: act only for noise levels ``sigma/alpha`` in ``[lo, hi]``.
    """

    differentiates = True

    def __init__(self, scale: Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)] = 1.0,
                 interval: Interval | None = None) -> None:
        super().__init__(interval)
        self.scale = scale

    def gradient(self, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None) -> torch.Tensor:
        """``grad_x log p(y | x_t)`` at ``(x, t)``."""
        raise NotImplementedError

    def apply(self, evaluate: Evaluate, model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        output = evaluate(x, t, y)
        if self.scale == 0:
            return output
        with torch.enable_grad():
            grad = self.gradient(model, x.detach(), t, y)
        return add_score(model, output, x, t, self.scale * grad.to(output.dtype))


def requested_labels(labels: str | int | Sequence[int] | torch.Tensor | None, n: int,
                     classes: int | None = None) -> torch.Tensor | None:
    """One label per sample, from what a spec's ``sample.labels`` says.

    ``"all"``: the ``classes`` classes in equal contiguous blocks (sample ``i`` gets class
    ``i * classes // n``: with ``n`` a multiple of ``classes``, one grid row per class); an int:
    every sample that class; a list of classes: equal blocks of each, in order; a tensor of
    ``n`` labels: as given; None: no labels.
    """
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor) and labels.dim() == 1 and len(labels) == n:
        chosen = labels.long()
    else:
        if isinstance(labels, str):
            if labels != "all":
                raise LabelsError("'all', a class or a list of classes", labels)
            if classes is None:
                raise LabelsError("a model or data set that knows its classes (for 'all')",
                                  labels)
            choices = list(range(classes))
        elif isinstance(labels, int):
            choices = [labels]
        else:
            choices = [int(c) for c in labels]
        if not choices:
            raise LabelsError("at least one class", labels)
        index = torch.arange(n) * len(choices) // n
        chosen = torch.tensor(choices, dtype=torch.long)[index]
    if classes is not None and len(chosen) and (chosen.min() < 0 or chosen.max() >= classes):
        raise LabelsError(f"classes in 0..{classes - 1}",
                          sorted(set(chosen.tolist()) - set(range(classes)))[:10])
    return chosen


class LabelsError(ValueError):
    """Requested labels the model does not know: ``expected`` says what it knows."""

    def __init__(self, expected: str, given: object) -> None:
        super().__init__(f"labels: expected {expected}; given {given}")
        self.expected = expected


def replace_x0(model: ScoreModel, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
               correct: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``output`` (the network's parameterisation) whose ``x0_hat`` is replaced by
    ``correct(x0_hat)``; a learned variance half is kept as it is."""
    prediction, v = model.split(output)
    x0 = correct(model.convert(prediction, x, t, "x0"))
    prediction = model.process.convert(x0, x, t.to(x.dtype), "x0", model.network.prediction)
    return prediction if v is None else torch.cat([prediction, v], dim=1)


def add_score(model: ScoreModel, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              delta: torch.Tensor) -> torch.Tensor:
    """``output`` (the network's parameterisation) with ``delta`` added to its score.

    Where ``alpha(t) = 0`` (a path that reaches pure noise) nothing is added: ``x_t`` is then
    independent of ``x_0``, so every ``grad_x log p(. | x_t)`` is exactly 0, while a score
    increment written as a data prediction would divide by ``alpha``."""
    prediction, v = model.split(output)
    time = t.to(x.dtype)
    step = model.process.convert(delta, torch.zeros_like(x), time, "score",
                                 model.network.prediction)
    pure_noise = (model.process.alpha(time) == 0).reshape(-1, *([1] * (x.dim() - 1)))
    step = torch.where(pure_noise, torch.zeros_like(step), step)  # no host sync on a device
    prediction = prediction + step
    return prediction if v is None else torch.cat([prediction, v], dim=1)


__all__ = [
    "MOVE",
    "Evaluate",
    "GradientGuidance",
    "Guidance",
    "Interval",
    "LabelsError",
    "add_score",
    "noise_level",
    "requested_labels",
]

"""The pydantic models of a spec.

A component section is a mapping ``{kind: <registered name>, ...params}``. The model below only
checks that such a section is a mapping; :mod:`diffusers_kit.spec.validate` then validates its
parameters against the component's own signature-derived model (see :mod:`registry`).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from diffusers_kit.devices import device_available
from diffusers_kit.references import TrainedModel

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d{1,4}|mps)$"


def _device_name(device: str) -> str:
    """``device`` when it is a device name; else a ValueError that names the allowed values in
    words (the JSON schema keeps the pattern, for editors)."""
    if re.fullmatch(DEVICE_PATTERN, device) is None:
        raise ValueError("a device name matching the pattern auto, cpu, cuda, cuda:<index> "
                         "(up to 4 digits) or mps")
    return device


@dataclass(frozen=True)
class ComponentOf:
    """Marks a field as holding a component (or a list of components) of ``kind``."""

    kind: str
    many: bool = False


ComponentConfig = dict[str, Any]


def component(kind: str) -> Any:
    return Annotated[ComponentConfig, ComponentOf(kind)]


def optional_component(kind: str) -> Any:
    return Annotated[ComponentConfig | None, ComponentOf(kind)]


def components(kind: str) -> Any:
    return Annotated[list[ComponentConfig], ComponentOf(kind, many=True)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def field_info(model: type[BaseModel], name: str) -> tuple[Any, ComponentOf | None]:
    """A field's annotation and its :class:`ComponentOf` marker (None when it holds no
    component); ``(None, None)`` for an unknown field."""
    info = model.model_fields.get(name)
    if info is None:
        return None, None
    marker = next((m for m in info.metadata if isinstance(m, ComponentOf)), None)
    return info.annotation, marker


def section_model(annotation: Any) -> type[Section] | None:
    """The Section model of a field's annotation (``Section | None`` included)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    return None


def walk_components(data: Any, model: type[BaseModel] | None = None,
                    path: tuple[str | int, ...] = ()
                    ) -> Iterator[tuple[tuple[str | int, ...], str, Any]]:
    """Every component value of ``data`` — a spec as a mapping (raw or resolved) or a validated
    :class:`Spec` — as ``(path, kind, value)``, in field order, derived from the
    :class:`ComponentOf` markers of the section models (so a new component field needs no
    list updated anywhere). Lists of components give one entry per item; None values and
    sections that are not mappings are skipped."""
    model = model or Spec
    for name in model.model_fields:
        if isinstance(data, BaseModel):
            value = getattr(data, name, None)
        elif isinstance(data, dict):
            value = data.get(name)
        else:
            return
        if value is None:
            continue
        annotation, marker = field_info(model, name)
        if marker is not None:
            if not marker.many:
                yield (*path, name), marker.kind, value
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    yield (*path, name, index), marker.kind, item
        elif (section := section_model(annotation)) is not None:
            yield from walk_components(value, section, (*path, name))


#: the widest power-function EMA profile (gamma -> -1): sigma_rel < 12^(-1/2) (diffusers_kit.ema)
SIGMA_REL_MAX = 12 ** -0.5
SigmaRel = Annotated[float, Field(gt=0.0, lt=SIGMA_REL_MAX, allow_inf_nan=False, description=(
    "the EMA's length relative to the training run, the standard deviation of its profile "
    "over the steps divided by their number (Karras et al. 2024, eq. 3; 0.05 to 0.10 is "
    "typical), below 12^(-1/2) = 0.2887"))]


class PostHocEMASection(Section):
    """Power-function EMAs kept during training, with snapshots from which the average of any
    length is reconstructed afterwards (Karras et al. 2024; :mod:`diffusers_kit.ema`)."""

    sigma_rels: Annotated[list[SigmaRel], Field(min_length=1, max_length=8, description=(
        "the widths of the EMAs kept (EDM2: 0.05 and 0.10); each snapshot holds one copy of "
        "the weights per width"))] = Field(default_factory=lambda: [0.05, 0.10])
    every: Annotated[int, Field(ge=1, le=10**9, strict=True, description=(
        "steps between snapshots (the reconstruction needs several over the run; each is "
        "stored in the checkpoint)"))] = 100


class TrainSection(Section):
    """How the network is fitted."""

    steps: Annotated[int, Field(ge=0, le=10**9, strict=True,
                                 description="optimisation steps (0 skips training)")] = 2000
    batch_size: Annotated[int, Field(ge=1, le=1_000_000, strict=True, description=(
        "examples per step (per micro-batch with `grad_accumulation`)"))] = 128
    optimizer: component("optimizer") = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"kind": "adam", "lr": 1e-3},
        description="the optimizer and its learning rate")
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0, strict=True,
                                     description=(
        "decay of the exponential moving average of the weights that sampling uses (bias-"
        "corrected: the initial weights carry no weight); it averages about the last "
        "1/(1 - decay) steps; 0 disables the EMA"))] = 0.999
    grad_clip: Annotated[float | None, Field(gt=0.0, allow_inf_nan=False, strict=True, description=(
        "clip the global gradient norm to this (`null` disables)"))] = 1.0
    log_every: Annotated[int, Field(ge=1, le=10**9, strict=True, description=(
        "steps between loss reports (the only host synchronisation of the training loop)"))] = 50
    checkpoint_every: Annotated[int, Field(
        ge=0, le=10**9, strict=True,
        description="write the resumable checkpoint every N steps (0: only at the end)")] = 0
    lr_schedule: Annotated[Literal["constant", "cosine"], Field(
        description="after warm-up: constant, or cosine decay to min_lr_ratio x lr")] = "constant"
    warmup_steps: Annotated[int, Field(ge=0, le=10**9, strict=True,
                                        description="linear learning-rate warm-up")] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1, strict=True,
                                          description="cosine decay's floor")] = 0.0
    grad_accumulation: Annotated[int, Field(
        ge=1, le=65536, strict=True,
        description="micro-batches of batch_size per optimizer step")] = 1
    precision: Annotated[Literal["fp32", "bf16", "fp16"], Field(
        description="mixed precision (fp16 with a gradient scaler, CUDA only)")] = "fp32"
    compile: Annotated[bool, Field(strict=True, description="torch.compile the network")] = False
    post_hoc_ema: PostHocEMASection | None = Field(default=None, description=(
        "store power-function EMA snapshots in the checkpoint, so that `sample.ema_sigma_rel` "
        "can pick the EMA length after training (post-hoc EMA; null: none)"))


class SampleSection(Section):
    """How samples are drawn from the trained model."""

    n: Annotated[int, Field(ge=1, le=1_000_000, strict=True, description="number of samples")] = 64
    batch_size: Annotated[int | None, Field(ge=1, le=1_000_000, strict=True,
                                             description="default: all at once")] = None
    solver: component("solver") = Field(  # type: ignore[valid-type]
        description="the sampler: an SDE / ODE solver or a Markov chain")
    guidance: components("guidance") = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="guidance terms added to the model's prediction (they add up, in order)")
    labels: Annotated[
        Literal["all"] | Annotated[int, Field(ge=0, le=1_000_000, strict=True)]
        | Annotated[list[Annotated[int, Field(ge=0, le=1_000_000, strict=True)]],
                    Field(min_length=1, max_length=10_000)]
        | None,
        Field(description="classes to draw: 'all' (equal blocks per class, one grid row "
                          "each), one class, or a list of classes (equal blocks); default: "
                          "none (unconditional)")] = None
    ema_sigma_rel: Annotated[SigmaRel | None, Field(description=(
        "sample with the power-function EMA of this relative length, reconstructed from the "
        "snapshots that `train.post_hoc_ema` stored (null: the weights of `train.ema_decay`)"))
    ] = None


class RestoreSection(Section):
    """Inverse problems: measure known images through the method's forward model, restore them
    (see :mod:`diffusers_kit.restore`)."""

    method: component("guidance") = Field(  # type: ignore[valid-type]
        description="a measurement method (replacement, pigdm, dps) with its operator: "
                    "{kind: dps, operator: {kind: inpaint, mask: box}}")
    n: Annotated[int, Field(ge=1, le=100_000, strict=True,
                            description="images to restore")] = 8
    samples_per_image: Annotated[int, Field(ge=1, le=1000, strict=True,
                                            description="restorations per image")] = 1
    images: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                                 description="'heldout' (the data set's held-out examples, in "
                                             "order) or an .npz / .npy file of images")] = "heldout"
    solver: optional_component("solver") = Field(  # type: ignore[valid-type]
        default=None, description="default: the sample section's solver")
    batch_size: Annotated[int | None, Field(ge=1, le=1_000_000, strict=True,
                                             description="default: all at once")] = None


class EvaluateSection(Section):
    """Metrics computed on the samples against held-out data."""

    metrics: components("metric") = Field(  # type: ignore[valid-type]
        default_factory=lambda: [{"kind": "swd"}],
        description=("the metrics, each reported with its real-vs-real noise floor where it "
                     "has one"))


class OutputSection(Section):
    """Where and how results are written."""

    root: str = Field(default="runs", min_length=1, max_length=1024, pattern=r"^[^\x00]*$",
                      description="run folders go to <root>/<name>/<timestamp> (~ is your home)")
    grid_columns: Annotated[int | None, Field(ge=1, le=10_000, strict=True,
                                               description="default: square grid")] = None


class Spec(Section):
    """A complete dkit run: data -> train -> sample -> evaluate -> report.

    ``model`` names a model trained by another run or spec (see :mod:`diffusers_kit.pipeline`):
    the run then samples and evaluates that model, and ``data``, ``process``, ``network``,
    ``objective`` and ``train`` come from it. Without ``model`` those sections are required.
    Without ``sample`` the run trains only (a classifier, a feature network, an autoencoder).

    ``autoencoder`` makes the run train a first stage of latent diffusion instead of a
    diffusion model (no ``process`` / ``network``; the objective defaults to
    ``reconstruction``). ``latent`` names such a trained autoencoder: the run's diffusion then
    lives in its latent space (see :mod:`diffusers_kit.latent`).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$", description="run "
                                "name: letters, digits, _ . - (not first), at most 100")]
    model: Annotated[TrainedModel | None, Field(
        description="sample a model trained elsewhere: a run folder or a spec file")] = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True, description=(
        "seeds the network's initial weights, training and sampling"))] = 0
    device: Annotated[str, Field(json_schema_extra={"pattern": DEVICE_PATTERN}, description=(
        "`auto` (CUDA when available, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`")),
                      AfterValidator(_device_name), AfterValidator(device_available)] = "auto"
    data: optional_component("data") = Field(  # type: ignore[valid-type]
        default=None, description=(
            "the data set; required unless `model` names a trained model"))
    autoencoder: optional_component("autoencoder") = Field(  # type: ignore[valid-type]
        default=None, description="train this first stage of latent diffusion (kind "
        "autoencoder) instead of a diffusion model: leave process and network out")
    latent: Annotated[TrainedModel | None, Field(
        description="diffuse in the latent space of this trained autoencoder (a run folder "
                    "or an autoencoder spec): data are encoded once, samples decoded")] = None
    process: optional_component("process") = Field(  # type: ignore[valid-type]
        default=None, description=(
            "the noise process; required unless `model` supplies it (an `autoencoder` run "
            "has none)"))
    network: optional_component("network") = Field(  # type: ignore[valid-type]
        default=None, description=(
            "the network (its data shape comes from the data set, or the autoencoder's latents "
            "with `latent`); required unless `model` supplies it (an `autoencoder` run has "
            "none)"))
    objective: optional_component("objective") = Field(  # type: ignore[valid-type]
        default=None, description=(
            "the training objective; required unless `model` supplies it (an `autoencoder` "
            "run defaults to `reconstruction`)"))
    train: TrainSection = Field(default_factory=TrainSection,
                                description="how the network is fitted (below)")
    sample: SampleSection | None = Field(
        default=None, description="how samples are drawn (below); without it the run trains only")
    restore: RestoreSection | None = Field(
        default=None, description="inverse problems: restore measured held-out images (below)")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection,
                                      description="the metrics computed on the samples (below)")
    output: OutputSection = Field(
        default_factory=OutputSection,
        description="where the run folder goes and how the grid is laid out (below)")
    track: components("tracker") = Field(  # type: ignore[valid-type]
        default_factory=list,
        description=("experiment trackers that receive the run's loss, learning rate, metrics "
                     "and samples, e.g. [{kind: tensorboard}, {kind: mlflow}]"))

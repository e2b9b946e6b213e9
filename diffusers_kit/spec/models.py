"""The pydantic models of a spec.

A component section is a mapping ``{kind: <registered name>, ...params}``. The model below only
checks that such a section is a mapping; :mod:`diffusers_kit.spec.validate` then validates its
parameters against the component's own signature-derived model (see :mod:`registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class ComponentOf:
    """Marks a field as holding a component (or a list of components) of ``kind``."""

    kind: str
    many: bool = False


ComponentConfig = dict[str, Any]


def component(kind: str) -> Any:
    return Annotated[ComponentConfig, ComponentOf(kind)]


def components(kind: str) -> Any:
    return Annotated[list[ComponentConfig], ComponentOf(kind, many=True)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TrainSection(Section):
    """How the network is fitted."""

    steps: Annotated[int, Field(ge=0, description="optimisation steps (0 skips training)")] = 2000
    batch_size: Annotated[int, Field(ge=1)] = 128
    optimizer: component("optimizer") = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"kind": "adam", "lr": 1e-3}
    )
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0, description="0 disables the EMA")] = 0.999
    grad_clip: Annotated[float | None, Field(gt=0.0)] = 1.0
    log_every: Annotated[int, Field(ge=1)] = 50
    checkpoint_every: Annotated[int, Field(
        ge=0, description="write the resumable checkpoint every N steps (0: only at the end)")] = 0
    lr_schedule: Annotated[Literal["constant", "cosine"], Field(
        description="after warm-up: constant, or cosine decay to min_lr_ratio x lr")] = "constant"
    warmup_steps: Annotated[int, Field(ge=0, description="linear learning-rate warm-up")] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1, description="cosine decay's floor")] = 0.0
    grad_accumulation: Annotated[int, Field(
        ge=1, description="micro-batches of batch_size per optimizer step")] = 1
    precision: Annotated[Literal["fp32", "bf16", "fp16"], Field(
        description="mixed precision (fp16 with a gradient scaler, CUDA only)")] = "fp32"
    compile: Annotated[bool, Field(description="torch.compile the network")] = False


class SampleSection(Section):
    """How samples are drawn from the trained model."""

    n: Annotated[int, Field(ge=1, description="number of samples")] = 64
    batch_size: Annotated[int | None, Field(ge=1, description="default: all at once")] = None
    solver: component("solver")  # type: ignore[valid-type]


class EvaluateSection(Section):
    """Metrics computed on the samples against held-out data."""

    metrics: components("metric") = Field(  # type: ignore[valid-type]
        default_factory=lambda: [{"kind": "swd"}]
    )


class OutputSection(Section):
    """Where and how results are written."""

    root: str = Field(default="runs", description="run folders go to <root>/<name>/<timestamp>")
    grid_columns: Annotated[int | None, Field(ge=1, description="default: square grid")] = None


class Spec(Section):
    """A complete dkit run: data -> train -> sample -> evaluate -> report."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run name")]
    seed: Annotated[int, Field(ge=0)] = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")] = "auto"
    data: component("dataset")  # type: ignore[valid-type]
    process: component("process")  # type: ignore[valid-type]
    network: component("network")  # type: ignore[valid-type]
    objective: component("objective")  # type: ignore[valid-type]
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    output: OutputSection = Field(default_factory=OutputSection)

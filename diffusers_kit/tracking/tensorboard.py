"""TensorBoard event files in the run folder, through :class:`torch.utils.tensorboard.
SummaryWriter` (needs the ``tensorboard`` package: ``pip install diffusers_kit[tensorboard]``).

Scalars ``train/loss`` and ``train/learning_rate`` at every logged step, ``metrics/<name>``
(each metric with its ``metrics/<name>_floor``) at the last step, and the sample grid
(``samples.png``'s picture) as the image ``samples``. ``tensorboard --logdir RUNS_ROOT`` shows
every run beside the others.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffusers_kit.tracking.base import Tracker, missing_extra


class TensorBoard(Tracker):
    """Write TensorBoard event files into ``RUN_DIR/<folder>``.

    Args:
        folder: the subfolder of the run folder that holds the event files.
    """

    def __init__(self, folder: str = "tensorboard") -> None:
        missing_extra("tensorboard", "tensorboard", "tensorboard")
        if not folder or folder.startswith(("/", "..")) or "\\" in folder:
            raise ValueError(f"folder must be a subfolder name inside the run folder, not "
                             f"{folder!r}")
        self.folder = folder
        self.writer: Any = None

    def start(self, run: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.dir / self.folder))

    def train_step(self, run: Any, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def samples(self, run: Any, samples: Any, step: int) -> None:
        from diffusers_kit.solvers.base import SampleResult

        components = run.components
        data = components.data
        picture = SampleResult(samples, 0).picture(
            components.dataset, run.spec.output.grid_columns,
            reference=data.heldout if data is not None else None)
        self.writer.add_image("samples", np.asarray(picture.convert("RGB")), step,
                              dataformats="HWC")
        self.writer.flush()

    def finish(self, run: Any, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"metrics/{name}", value, step)
        self.writer.close()

"""Restoration: simulate a measurement of known images through a forward model, sample the
posterior with a measurement-guidance method, and judge the result.

``restore(diffusion, method, images, solver)`` is what ``dkit restore`` and a spec's
``restore:`` section run:

1. ``y = method.operator.simulate(images)`` — the **same** operator object the method guides
   with (``A(x) + sigma_y n``, ``sigma_y`` in data units, seeded);
2. ``samples_per_image`` posterior samples per image, by any solver, with the method bound to
   its ``y`` (:meth:`ScoreModel.guided`);
3. metrics per restoration: PSNR and SSIM against the ground truth (images only), the
   **consistency** ``||y - A x||_2 / sqrt(m)`` (RMS residual over the ``m`` measured values, in
   data units: an exact method leaves about ``sigma_y``), each as mean, std and bootstrap
   interval; NFE (network evaluations of one restoration) and seconds.

:func:`figure` draws one row per image: the measurement (shown as ``A^+ y``, in data space) |
the restorations | the ground truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from diffusers_kit.arrays import ArrayFile
from diffusers_kit.data.base import DataSplits
from diffusers_kit.diffusion import batch_count
from diffusers_kit.metrics.consistency import consistency
from diffusers_kit.metrics.floor import ErrorBars, mean_with_interval
from diffusers_kit.metrics.restoration import psnr_per_image, ssim_per_image
from diffusers_kit.report import labelled_grid, scatter_plot
from diffusers_kit.run_folder import write_json

if TYPE_CHECKING:
    from diffusers_kit.diffusion import Diffusion
    from diffusers_kit.guidance.measurement import MeasurementGuidance
    from diffusers_kit.solvers.base import Progress, Solver


@dataclass
class Restoration:
    """What :func:`restore` produced: ``truth`` (n images), their ``measurement`` y, the naive
    ``A^+ y`` (``pseudo_inverse``), ``samples`` (``n * samples_per_image``, image ``i``'s
    restorations at rows ``i * k .. i * k + k - 1``) and the metrics."""

    truth: torch.Tensor
    measurement: torch.Tensor
    pseudo_inverse: torch.Tensor
    samples: torch.Tensor
    samples_per_image: int
    nfe: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def restore(
    diffusion: Diffusion,
    method: MeasurementGuidance,
    images: torch.Tensor,
    solver: Solver,
    *,
    samples_per_image: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    extra_guidance: tuple = (),
    progress: Progress | None = None,
    rows: tuple[int, int] | None = None,
) -> Restoration:
    """Restore ``images`` (ground truth, ``(n, *data_shape)``) from their simulated
    measurements with ``method``; see the module docstring.

    ``rows = (start, stop)`` restores only the restorations ``start .. stop - 1`` of the
    ``n * samples_per_image`` (a shard; both multiples of ``samples_per_image``, so whole
    images): every image is measured as in the whole restoration (the measurement noise is
    drawn for all ``n``) and restoration ``i`` draws sample ``i``'s noise stream, so the rows
    equal those of the whole restoration with the same ``batch_size`` when the shard starts on
    one of its batches. The result holds that shard's images and restorations only."""
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be at least 1, got {samples_per_image}")
    truth = images.detach().float().cpu()
    operator = method.operator
    generator = torch.Generator().manual_seed(seed)
    measurement = operator.simulate(truth, generator)
    naive = operator.pinv(measurement.double())
    k = samples_per_image
    start, stop = (0, len(truth) * k) if rows is None else rows
    if not 0 <= start < stop <= len(truth) * k or start % k or stop % k:
        raise ValueError(f"rows {start}..{stop} are not whole images of {len(truth)} with "
                         f"{k} restorations each")
    repeated = measurement.repeat_interleave(k, dim=0)[start:stop]
    started = time.perf_counter()
    result = diffusion.sample(stop - start, solver, seed=seed, batch_size=batch_size,
                              guidance=[method, *extra_guidance], measurements=repeated,
                              progress=progress, first=start)
    seconds = time.perf_counter() - started
    nfe = result.nfe // batch_count(stop - start, batch_size, diffusion.network.data_shape)
    images_kept = slice(start // k, stop // k)
    truth, measurement, naive = truth[images_kept], measurement[images_kept], naive[images_kept]
    samples = result.samples.float().cpu()
    metrics = restoration_metrics(operator, truth, measurement, naive, samples, k, seed,
                                  value_range)
    metrics["nfe"] = float(nfe)  # of each restoration
    metrics["seconds"] = seconds
    return Restoration(truth, measurement, naive.float(), samples, k, nfe, seconds, metrics)


def restoration_metrics(operator, truth: torch.Tensor, measurement: torch.Tensor,  # type: ignore[no-untyped-def]
                        naive: torch.Tensor, samples: torch.Tensor, samples_per_image: int,
                        seed: int, value_range: tuple[float, float] = (-1.0, 1.0)
                        ) -> dict[str, float]:
    """The judgement of restorations (module docstring, point 3): PSNR and SSIM (images) and
    the consistency, each with its bootstrap interval from ``seed``; the forward model's
    ``sigma_y``; the PSNR of the baseline ``A^+ y`` (``naive``). ``samples``: image ``i``'s
    restorations at rows ``i * k .. i * k + k - 1``. What :func:`restore` reports, and what
    ``dkit merge`` recomputes over the joined shards of a restoration."""
    k = samples_per_image
    reference = truth.repeat_interleave(k, dim=0)
    repeated = measurement.repeat_interleave(k, dim=0)
    bars = ErrorBars()
    metrics: dict[str, float] = {}
    metric_generator = torch.Generator().manual_seed(seed)
    if samples.dim() == 4:
        low, high = value_range
        metrics.update(mean_with_interval("psnr", psnr_per_image(
            samples.double(), reference.double(), low, high), metric_generator, bars))
        size = min(7, samples.shape[-1] - (1 - samples.shape[-1] % 2))
        metrics.update(mean_with_interval("ssim", ssim_per_image(
            samples.double(), reference.double(), low, high, max(3, size), 1.5),
            metric_generator, bars))
    metrics.update(mean_with_interval("consistency", consistency(operator, samples.double(),
                                                                  repeated.double()),
                                      metric_generator, bars))
    metrics["consistency_sigma_y"] = float(operator.sigma_y)
    if samples.dim() == 4:  # the baseline a method must beat: A^+ y
        metrics["pinv_psnr"] = float(psnr_per_image(naive.double(), truth.double(),
                                                    *value_range).mean())
    return metrics


def figure(restoration: Restoration, to_display, cell: int = 48) -> Image.Image:  # type: ignore[no-untyped-def]
    """One column per image; rows: the measurement (shown as ``A^+ y``, in data space), the
    restorations, the ground truth — each row labelled on the left."""
    r = restoration
    k, n = r.samples_per_image, len(r.truth)
    restored = r.samples.reshape(n, k, *r.samples.shape[1:]).transpose(0, 1)
    rows = [("measurement", to_display(r.pseudo_inverse))]
    rows += [(f"restoration {i + 1}" if k > 1 else "restoration", to_display(restored[i]))
             for i in range(k)]
    rows.append(("truth", to_display(r.truth)))
    return labelled_grid(rows, cell=cell)


def restoration_images(source: str, data: DataSplits, n: int) -> torch.Tensor:
    """The images to restore: the first ``n`` held-out examples (``"heldout"``) or the first
    ``n`` of an .npz (array ``x``, ``images`` or its only array) / .npy file, checked against
    the data's shape."""
    if source == "heldout":
        images = data.heldout
    else:
        path = Path(source).expanduser()
        try:
            with ArrayFile(path) as file:  # the one array reader: refuses damaged, empty, NaN
                names = [k for k in ("x", "images") if k in file.names] or file.names
                if len(names) > 1 and not {"x", "images"} & set(file.names):
                    raise ValueError(f"arrays {file.names}: name one 'x' or 'images'")
                array = file.array(names[0] if names else None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"a readable .npz / .npy file of images ({exc})") from None
        images = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if tuple(images.shape[1:]) != tuple(data.shape):
        raise ValueError(f"images of shape {tuple(data.shape)} (the model's data); given "
                         f"{tuple(images.shape[1:])}")
    if not torch.isfinite(images).all():
        raise ValueError("finite images (these hold NaN or infinity)")
    return images[:n].float()


def write_restoration(result: Restoration, folder: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    """``restore.png`` (:func:`figure`, or a scatter of the restorations for vector data),
    ``restore.npz`` (truth, measurement, pseudo_inverse, samples) and ``restore.json``."""
    if result.samples.dim() == 4:
        figure(result, dataset.to_display).save(folder / "restore.png")
    else:
        scatter_plot(result.samples, result.truth).save(folder / "restore.png")
    np.savez_compressed(folder / "restore.npz", truth=result.truth.numpy(),
                        measurement=result.measurement.float().numpy(),
                        pseudo_inverse=result.pseudo_inverse.numpy(),
                        samples=result.samples.numpy())
    write_json(folder / "restore.json", result.metrics)  # NaN / infinity as null


__all__ = ["Restoration", "consistency", "figure", "restoration_images",
           "restoration_metrics", "restore", "write_restoration"]

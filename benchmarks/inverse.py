"""Inverse problems at our scale: the methods x tasks table of the DPS / DDRM papers.

    cd /work/measure  # where runs/ddpm, runs/patches_ddpm and runs/features_digits live
    OMP_NUM_THREADS=1 python benchmarks/inverse.py [--root runs] [--n 100] \
        [--tasks box,random,sr2,deblur,colorize] \
        [--methods replacement,repaint,pigdm,dps,ddrm,ddrm20,ddnm,ddnm_plus] \
        [--out table.md] [--pictures DIR]

Tasks (the first ``--n`` held-out examples, one restoration each, measurement seed 0):

- on the digits DDPM (``ROOT/ddpm/latest``, 1x8x8 in [-1, 1]): ``box`` (inpaint, the centred
  hole of half the side, noiseless), ``random`` (inpaint, 30 % of the pixels kept, noiseless),
  ``sr2`` (2x super-resolution, ``sigma_y = 0.05``), ``deblur`` (Gaussian blur of ``sigma = 1``
  pixel, ``sigma_y = 0.05``);
- on the colour-patches DDPM (``ROOT/patches_ddpm/latest``, 3x16x16): ``colorize`` (noiseless).

Methods (``data_std = 0.5`` everywhere: pixels in [-1, 1]): ``replacement`` with DDIM (50 steps,
``eta = 0``, ``clip_x0 = 1``); ``repaint``: replacement with RePaint's resampling (250 steps,
``jump_length = 10``, ``resampling = 5``, ``clip_x0 = 1``); ``pigdm`` (scale 1) and ``dps``
(``zeta = 1``) with DDIM 50; ``ddrm`` (the paper's ``eta = 0.85``, ``eta_b = 1``) taking DDIM's
50 steps, ``ddrm20`` the same on the paper's 20; ``ddnm`` with DDIM 50 at ``eta = 1`` (the
paper's ancestral sampler on that sub-sequence) and ``ddnm_plus`` taking DDIM's 50 steps.

Columns: PSNR and SSIM against the truth (mean [95 % bootstrap interval]); the consistency
``||y - A x|| / sqrt(m)`` (an exact posterior sample leaves about ``sigma_y``); the Fréchet
distance of the restorations to the held-out digits in the feature space of
``ROOT/features_digits/latest`` (digit tasks only; the reference set is the first ``n``
held-out digits, i.e. the truths themselves, and ``floor`` is the real-vs-real FD at the same
``n``); network evaluations per restoration; sampling seconds for all ``n`` (one thread, on a
shared machine: indicative). Each task's first row is the baseline ``A^+ y`` (no network), as
measured: for deblurring it amplifies the noise along the blur's tiny singular values.

``--pictures DIR`` writes ``DIR/TASK.png``: the first 8 images, one row per method between the
measurement (``y`` for deblurring, else ``A^+ y``) and the truth. The table and how long it
took are recorded in the inverse-problems documentation (``--out`` writes the markdown table).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.graph import open_run
from diffusers_kit.guidance import DDNM, DDRM, DPS, DDNMPlus, PiGDM, Replacement
from diffusers_kit.guidance.measurement import MeasurementGuidance
from diffusers_kit.metrics import FrechetDistance
from diffusers_kit.metrics.floor import ErrorBars, mean_with_interval
from diffusers_kit.metrics.restoration import psnr_per_image, ssim_per_image
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.registry import get_registry
from diffusers_kit.report import labelled_grid
from diffusers_kit.restore import Restoration, consistency, restore
from diffusers_kit.solvers import DDIM, RePaint
from diffusers_kit.solvers.base import Solver

DATA_STD = 0.5
PICTURE_COLUMNS = 8


@dataclass(frozen=True)
class Task:
    model: str  # the run under --root: ddpm (digits) or patches_ddpm (colour patches)
    operator: dict
    fd: bool  # whether the digit feature network applies


TASKS = {
    "box": Task("ddpm", {"kind": "inpaint", "mask": "center", "box_size": 0.5}, True),
    "random": Task("ddpm", {"kind": "inpaint", "mask": "random", "rate": 0.3}, True),
    "sr2": Task("ddpm", {"kind": "super_resolution", "scale": 2, "sigma_y": 0.05}, True),
    "deblur": Task("ddpm", {"kind": "blur", "sigma": 1.0, "sigma_y": 0.05}, True),
    "colorize": Task("patches_ddpm", {"kind": "colorize"}, False),
}

Method = Callable[[ForwardModel], MeasurementGuidance]
METHODS: dict[str, tuple[Method, Callable[[], Solver]]] = {
    "replacement": (lambda op: Replacement(op, data_std=DATA_STD),
                    lambda: DDIM(steps=50, clip_x0=1.0)),
    "repaint": (lambda op: Replacement(op, data_std=DATA_STD),
                lambda: RePaint(steps=250, jump_length=10, resampling=5, clip_x0=1.0)),
    "pigdm": (lambda op: PiGDM(op, scale=1.0, data_std=DATA_STD),
              lambda: DDIM(steps=50, clip_x0=1.0)),
    "dps": (lambda op: DPS(op, zeta=1.0, data_std=DATA_STD),
            lambda: DDIM(steps=50, clip_x0=1.0)),
    "ddrm": (lambda op: DDRM(op, eta=0.85, eta_b=1.0),
             lambda: DDIM(steps=50, clip_x0=1.0)),
    "ddrm20": (lambda op: DDRM(op, eta=0.85, eta_b=1.0),
               lambda: DDIM(steps=20, clip_x0=1.0)),
    "ddnm": (lambda op: DDNM(op), lambda: DDIM(steps=50, eta=1.0, clip_x0=1.0)),
    "ddnm_plus": (lambda op: DDNMPlus(op), lambda: DDIM(steps=50, clip_x0=1.0)),
}


def interval(metrics: dict[str, float], name: str, digits: int) -> str:
    """``mean [low, high]``."""
    m, lo, hi = metrics[name], metrics[f"{name}_low"], metrics[f"{name}_high"]
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def image_metrics(x: torch.Tensor, truth: torch.Tensor, operator: ForwardModel,
                  y: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and consistency of ``x`` against ``truth`` / ``y``, as restore() computes
    them (the same SSIM window and bootstrap), for the ``A^+ y`` baseline."""
    generator, bars = torch.Generator().manual_seed(0), ErrorBars()
    x, truth = x.double(), truth.double()
    size = min(7, x.shape[-1] - (1 - x.shape[-1] % 2))
    out = mean_with_interval("psnr", psnr_per_image(x, truth, -1.0, 1.0), generator, bars)
    out.update(mean_with_interval("ssim", ssim_per_image(x, truth, -1.0, 1.0, max(3, size), 1.5),
                                  generator, bars))
    out.update(mean_with_interval("consistency", consistency(operator, x, y.double()),
                                  generator, bars))
    return out


def fd_cell(fd: FrechetDistance | None, samples: torch.Tensor, data) -> str:  # type: ignore[no-untyped-def]
    if fd is None:
        return "—"
    out = fd.evaluate(samples.float(), data, torch.Generator().manual_seed(0))
    return (f"{out['fd']:.1f} [{out['fd_low']:.1f}, {out['fd_high']:.1f}] "
            f"(floor {out['fd_floor']:.1f})")


def picture(task: str, operator: ForwardModel, results: dict[str, Restoration], to_display,  # type: ignore[no-untyped-def]
            cell: int = 48) -> Image.Image:
    """The first images of ``task``: the measurement (``y`` itself when it is an image of the
    data's shape, as for deblurring, where ``A^+ y`` is noise; else ``A^+ y``), one row per
    method, the truth."""
    first = next(iter(results.values()))
    k = min(PICTURE_COLUMNS, len(first.truth))
    if tuple(operator.measurement_shape) == tuple(operator.data_shape):
        shown, label = first.measurement[:k], "measurement y"
    else:
        shown, label = first.pseudo_inverse[:k], "measurement A^+ y"
    rows = [(label, to_display(shown.float()))]
    rows += [(name, to_display(r.samples[:k])) for name, r in results.items()]
    rows.append(("truth", to_display(first.truth[:k])))
    return labelled_grid(rows, title=f"{task}: {operator.describe()}", cell=cell)


def main() -> None:
    parser = argparse.ArgumentParser(description="inverse-problem methods x tasks table")
    parser.add_argument("--root", default="runs", help="where the trained runs are")
    parser.add_argument("--n", type=int, default=100, help="held-out images per task")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--batch-size", type=int, default=50, help="restorations per batch")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--pictures", type=Path, help="write TASK.png per task into this folder")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown task or method {unknown}; tasks: {', '.join(TASKS)}; methods: "
                     f"{', '.join(METHODS)}")
    torch.set_num_threads(1)
    root = Path(args.root)
    started = time.perf_counter()
    fd = None
    if any(TASKS[t].fd for t in tasks):
        fd = FrechetDistance(features=TrainedModel.resolve(str(root / "features_digits" /
                                                               "latest")))
    runs: dict[str, tuple] = {}
    lines = ["| task | method | PSNR (dB) | SSIM | consistency (σ_y) | FD | NFE | seconds |",
             "|---|---|---|---|---|---|---:|---:|"]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    for task_name in tasks:
        task = TASKS[task_name]
        if task.model not in runs:
            _, components = open_run(root / task.model / "latest")
            runs[task.model] = (components.diffusion, components.data, components.dataset)
        diffusion, data, dataset = runs[task.model]
        images = data.heldout[:args.n].float()
        operator = get_registry().build("forward_model", dict(task.operator),
                                        data_shape=tuple(data.shape))
        task_fd = fd if task.fd else None
        sigma = f"{operator.sigma_y:g}"
        results: dict[str, Restoration] = {}
        for method_name in methods:
            term, solver = METHODS[method_name]
            r = restore(diffusion, term(operator), images, solver(), samples_per_image=1,
                        seed=0, batch_size=args.batch_size)
            first = next(iter(results.values()), r)
            assert torch.equal(first.measurement, r.measurement), "one y per task"
            results[method_name] = r
            if len(results) == 1:  # the baseline, from the same y
                base = image_metrics(r.pseudo_inverse, r.truth, operator, r.measurement)
                emit(f"| {task_name} | A^+ y | {interval(base, 'psnr', 2)} | "
                     f"{interval(base, 'ssim', 3)} | {base['consistency']:.3g} ({sigma}) | "
                     f"{fd_cell(task_fd, r.pseudo_inverse, data)} | 0 | — |")
            m = r.metrics
            emit(f"| {task_name} | {method_name} | {interval(m, 'psnr', 2)} | "
                 f"{interval(m, 'ssim', 3)} | {m['consistency']:.3g} ({sigma}) | "
                 f"{fd_cell(task_fd, r.samples, data)} | {r.nfe} | "
                 f"{r.seconds:.1f} |")
        if args.pictures is not None and results:
            args.pictures.mkdir(parents=True, exist_ok=True)
            picture(task_name, operator, results, dataset.to_display).save(
                args.pictures / f"{task_name}.png")
    total = time.perf_counter() - started
    print(f"\n{args.n} images per task; {total / 60:.1f} minutes in all", flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
